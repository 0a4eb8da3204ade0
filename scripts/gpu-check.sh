#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU and neither network nor cargo: it runs the
# binaries that scripts/cuda-build.sh built on a CPU machine (target/gpu-bundle, ≤ 64 MiB,
# compressed) and writes a markdown report:
#   1. detections on CUDA against torchvision on CUDA (TF32 off), on the parity fixtures
#      (generated here by scripts/make_parity_fixtures.py with RETINANET_FIXTURE_DEVICE=cuda);
#   2. three training steps against torchvision's on CUDA (the train parity fixtures);
#   3. detect images/s at batch 1 and 8 (800×1067; f32, f16, bf16) and the training step
#      time, against torchvision (f32 and autocast) side by side.
# Needs python3 with torch and torchvision (CUDA builds), the CUDA 13 libraries (cuBLAS,
# cuRAND, NVRTC, cudart: from /usr/local/cuda, torch's nvidia-* wheels, or LD_LIBRARY_PATH)
# and the driver. Finishes in a few minutes on an H100/H200.
#
# Usage: scripts/gpu-check.sh            (report in $OUT/gpu-report.md, else target/gpu-check)
# Environment: GPU_CHECK_DEVICE (cuda), GPU_CHECK_RUNS (timed runs, 10),
# GPU_CHECK_BATCHES (detect batch sizes, "1 8"), GPU_CHECK_BIN (a folder of uncompressed
# binaries instead of the bundle's) and GPU_CHECK_FIXTURES (fixtures made before): with
# GPU_CHECK_DEVICE=cpu these rehearse the script on a CPU machine.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
dev="${GPU_CHECK_DEVICE:-cuda}"
runs="${GPU_CHECK_RUNS:-10}"
batches="${GPU_CHECK_BATCHES:-1 8}"
out="${OUT:-target/gpu-check}"
bundle=target/gpu-bundle
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
report="$out/gpu-report.md"
log="$out/gpu-check.log"
: > "$log"
say() { echo "$*" | tee -a "$log" >&2; }

# The binaries: decompressed from the bundle unless given.
bin="${GPU_CHECK_BIN:-$work/bin}"
if [ -z "${GPU_CHECK_BIN:-}" ]; then
  mkdir -p "$bin"
  python3 - "$bundle" "$bin" <<'EOF' || { say "cannot unpack $bundle"; exit 1; }
import lzma, os, sys
src, dst = sys.argv[1:]
for name in sorted(os.listdir(src)):
    if name.endswith(".xz"):
        path = os.path.join(dst, name[:-3])
        with lzma.open(os.path.join(src, name)) as f, open(path, "wb") as g:
            g.write(f.read())
        os.chmod(path, 0o755)
EOF
fi
photos="${RETINANET_PHOTOS:-$bundle/photos}"
[ -d "$photos" ] || photos="../shared/data/photos"
export RETINANET_PHOTOS="$(cd "$photos" && pwd)"

# The CUDA libraries the binaries link: wherever this machine keeps them.
if [ "$dev" != cpu ]; then
  libdirs=""
  for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    found="$( (ls -d /usr/local/cuda*/lib64/$lib /usr/local/cuda*/targets/*/lib/$lib 2>/dev/null;
      python3 -c 'import site,glob,sys; [print(p) for d in site.getsitepackages() for p in glob.glob(d+"/nvidia/*/lib/"+sys.argv[1])]' "$lib" 2>/dev/null;
      ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF}') | head -1)"
    if [ -n "$found" ]; then
      libdirs="$libdirs:$(dirname "$found")"
    else
      say "warning: $lib not found (set LD_LIBRARY_PATH)"
    fi
  done
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$libdirs"
  missing="$(ldd "$bin/detect" | grep 'not found' || true)"
  [ -n "$missing" ] && say "missing libraries: $missing"
fi

{
  echo "# GPU check"
  echo
  echo "- date: $(date -u +%FT%TZ)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "$dev")"
  echo "- torch: $(python3 -c 'import torch, torchvision; print(torch.__version__, "/ torchvision", torchvision.__version__, "/ CUDA", torch.version.cuda)')"
  echo "- binaries: $(ls "$bin" | tr '\n' ' ')"
} > "$report"

# 1–2. Fixtures computed by torchvision on the device, then the parity tests on it.
fx="${GPU_CHECK_FIXTURES:-$work/fixtures}"
export RETINANET_FIXTURE_DEVICE="$dev" RETINANET_FIXTURES="$fx" RETINANET_TEST_DEVICE="$dev"
export CUBLAS_WORKSPACE_CONFIG=":4096:8"
for s in parity:make_parity_fixtures.py train:make_train_fixtures.py train_scratch:make_scratch_fixtures.py; do
  [ -n "${GPU_CHECK_FIXTURES:-}" ] && break  # given: made elsewhere (a rehearsal)
  t0=$(date +%s)
  python3 "scripts/${s#*:}" "$fx/${s%%:*}" >> "$log" 2>&1 || say "fixtures ${s%%:*} failed (see $log)"
  say "fixtures ${s%%:*} on $dev: $(( $(date +%s) - t0 )) s"
done
for t in parity train_parity; do
  t0=$(date +%s)
  "$bin/$t" --test-threads 1 --nocapture > "$out/$t.log" 2>&1
  say "$t on $dev: exit $? in $(( $(date +%s) - t0 )) s"
done

# 3. Speed, ours and torchvision's, on the R50 v1 parity weights and a 480×640 photo
# (800×1067 after the transform).
w="$fx/parity/v1_r50_coco/model.safetensors"
img="$RETINANET_PHOTOS/astronaut.png"
python3 - "$img" "$work/photo.png" <<'EOF'
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").resize((640, 480)).save(sys.argv[2])
EOF
bench_json="$out/bench.jsonl"
: > "$bench_json"
ours() { "$bin/bench" --weights "$w" --image "$work/photo.png" --device "$dev" --runs "$runs" --warmup 2 "$@" >> "$bench_json" 2>> "$log" || say "bench $* failed"; }
theirs() { python3 scripts/bench_torchvision.py --weights "$w" --config v1_r50_coco --image "$work/photo.png" --device "$dev" --runs "$runs" --warmup 2 "$@" >> "$bench_json" 2>> "$log" || say "torchvision $* failed"; }
for b in $batches; do
  for d in f32 f16 bf16; do ours --mode detect --batch "$b" --dtype "$d"; done
  for a in none fp16 bf16; do theirs --mode detect --batch "$b" --autocast "$a"; done
done
ours --mode train --batch 2
for a in none bf16; do theirs --mode train --batch 2 --autocast "$a"; done

python3 - "$out" "$bench_json" >> "$report" <<'EOF'
import json, re, sys
from pathlib import Path
out, bench = Path(sys.argv[1]), Path(sys.argv[2])
print("\n## Detections on the device against torchvision on the device (TF32 off)\n")
print("| fixture | image | matched | extra |\n|---|---|---|---|")
tot = [0, 0, 0]
for line in (out / "parity.log").read_text(errors="replace").splitlines():
    m = re.match(r"(.+?): image (\d+): (\d+)/(\d+) torchvision detections matched, (\d+) extra", line)
    if m:
        name, i, got, n, extra = m.groups()
        print(f"| {name} | {i} | {got}/{n} ({100*int(got)/int(n):.2f} %) | {extra} |")
        tot = [tot[0] + int(got), tot[1] + int(n), tot[2] + int(extra)]
if tot[1]:
    print(f"\nAll: {tot[0]}/{tot[1]} matched ({100*tot[0]/tot[1]:.2f} %), {tot[2]} extra.")
for t in ("parity", "train_parity"):
    text = (out / f"{t}.log").read_text(errors="replace")
    res = re.findall(r"^test (\S+) \.\.\. (\w+)", text, re.M)
    print(f"\n## `{t}` tests on the device\n")
    for name, status in res:
        print(f"- {name}: {status}")
    summary = re.findall(r"^test result: .*$", text, re.M)
    print(f"\n{summary[-1] if summary else 'no test summary: see ' + t + '.log'}")
    if t == "train_parity":
        print("\nLosses after three steps (ours vs torchvision):\n")
        for l in re.findall(r"^.*after 3 steps: .* vs .*$", text, re.M)[:12]:
            print(f"- {l}")
rows = [json.loads(l) for l in bench.read_text().splitlines() if l.startswith("{")]
print("\n## Speed (median of the timed runs)\n")
print("| job | batch | implementation | precision | ms | images/s |\n|---|---|---|---|---|---|")
for r in rows:
    prec = r.get("dtype") or r.get("autocast")
    prec = "f32" if prec == "none" else prec
    ms = r["ms_median"]
    print(f"| {r['mode']} | {r['batch']} | {r['impl']} | {prec} | {ms:.1f} | {1000*r['batch']/ms:.1f} |")
print()
def best(mode, batch, impl):
    xs = [r["ms_median"] for r in rows if r["mode"] == mode and r["batch"] == batch and r["impl"].startswith(impl)]
    return min(xs) if xs else None
for mode, batch in sorted({(r["mode"], r["batch"]) for r in rows}):
    o, t = best(mode, batch, "retinanet"), best(mode, batch, "torchvision")
    if o and t:
        print(f"- {mode}, batch {batch}: ours (fastest precision) / torchvision (fastest) = {o/t:.2f}")
EOF
echo "" >> "$report"
echo "Total time: $(( $(date +%s) - start )) s. Logs: $log, $out/parity.log, $out/train_parity.log." >> "$report"
cat "$report"
