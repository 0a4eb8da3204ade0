#!/usr/bin/env bash
# Builds the crate with `--features cuda` on a machine without a CUDA install or a GPU.
#
# The CUDA 13.0 toolkit comes from the package registry's wheels (scripts/requirements-cuda.txt),
# installed once into a cache outside the clone and keyed by that list, as scripts/venv.sh does.
# Linking needs `libcuda.so`, which only the NVIDIA driver ships: a stub with one function per
# `cu*` name of cudarc's driver bindings (each returning CUDA_ERROR_STUB_LIBRARY) satisfies the
# linker. The stub is never found at run time (it is not on any library path), so the binaries
# use the real driver's `libcuda.so.1` where there is one and cannot start where there is none.
#
# Output: examples and test binaries in target/cuda (a link to the cargo target directory, kept
# in the cache so that reruns are incremental), `clippy --features cuda -- -D warnings` clean,
# and target/gpu-bundle: what scripts/gpu-check.sh needs on a GPU machine (≤ 64 MiB).
#
# Usage: scripts/cuda-build.sh [--no-clippy]
# Environment: CUDA_COMPUTE_CAP (default 90, an H100/H200; `nvidia-smi` is not needed),
# RETINANET_CACHE (default ~/.cache/retinanet), CUDA_HOME (use an installed toolkit instead).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
clippy=1
[ "${1:-}" = "--no-clippy" ] && clippy=0

root="${RETINANET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retinanet}"
req="$repo/scripts/requirements-cuda.txt"
key="$(sha256sum "$req" | cut -c1-16)"
cache="$root/cuda-$key"

# 1. The toolkit wheels (unless a CUDA_HOME with nvcc is given).
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "${CUDA_HOME}/bin/nvcc" ]; then
  if [ ! -f "$cache/.complete" ]; then
    echo "installing the CUDA 13.0 wheels into $cache" >&2
    rm -rf "$cache"
    mkdir -p "$cache"
    python3 -m venv "$cache/venv" >&2
    "$cache/venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    touch "$cache/.complete"
  fi
  CUDA_HOME="$(echo "$cache"/venv/lib/python3*/site-packages/nvidia/cu13)"
fi
export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2 >&2

# 2. Unversioned library names for the linker, and the driver stub.
links="$cache/link"
mkdir -p "$links"
for lib in cublas cublasLt curand nvrtc cudart; do
  real="$(ls "$CUDA_HOME/lib/lib$lib.so".* 2>/dev/null | head -1 || true)"
  [ -n "$real" ] && ln -sf "$real" "$links/lib$lib.so"
done
cudarc_src="$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')"
bindings="$cudarc_src/src/driver/sys/mod.rs"
stub_key="$(sha256sum "$bindings" | cut -c1-16)"
if [ "$(cat "$links/.stub" 2>/dev/null)" != "$stub_key" ]; then
  echo "writing the libcuda.so link stub from $bindings" >&2
  {
    echo "/* Link-time stand-in for the NVIDIA driver: every call fails (CUDA_ERROR_STUB_LIBRARY). */"
    grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$bindings" | sed 's/^pub unsafe fn //' | sort -u |
      sed 's/.*/int &(void) { return 34; }/'
  } > "$links/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/cuda_stub.c"
  echo "$stub_key" > "$links/.stub"
fi
export LIBRARY_PATH="$links${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$links"

# 3. The build, into a cargo target kept in the cache; target/cuda points at it.
export CARGO_TARGET_DIR="$root/cuda-target"
mkdir -p "$CARGO_TARGET_DIR" target
ln -sfn "$CARGO_TARGET_DIR" target/cuda
cargo build --release --features cuda --examples
# (cargo names each test binary on stderr: "Executable tests/parity.rs (PATH)".)
cargo test --release --features cuda --no-run 2> >(tee "$cache/test-binaries.txt" >&2)
if [ "$clippy" = 1 ]; then
  cargo clippy --release --features cuda --lib --examples -- -D warnings
fi

# 4. The bundle for scripts/gpu-check.sh: the binaries it runs, stripped and xz-compressed
# (each is ~55 MB, mostly the CUDA kernels' PTX, which compresses 7×), and the photos.
bundle="$repo/target/gpu-bundle"
rm -rf "$bundle"
mkdir -p "$bundle/photos"
pack() {
  strip -o "$bundle/$2" "$1"
  xz -T0 -6 "$bundle/$2"
}
for ex in detect bench; do
  pack "$CARGO_TARGET_DIR/release/examples/$ex" "$ex"
done
for t in parity train_parity; do
  exe="$(sed -n "s|.*Executable tests/$t.rs (\(.*\))|\1|p" "$cache/test-binaries.txt" | tail -1)"
  [ -n "$exe" ] || { echo "no test binary for tests/$t.rs" >&2; exit 1; }
  pack "$exe" "$t"
done
cp "$repo"/../shared/data/photos/*.{png,jpg} "$bundle/photos/"
size="$(du -sm "$bundle" | cut -f1)"
echo "bundle: $bundle, $size MiB" >&2
[ "$size" -le 64 ] || { echo "the bundle exceeds 64 MiB" >&2; exit 1; }
echo "built with --features cuda: $CARGO_TARGET_DIR/release (target/cuda)" >&2
