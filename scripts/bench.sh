#!/usr/bin/env bash
# CPU benchmark: our detect against torchvision's, side by side on the same weights (the
# R50-FPN v1 parity fixture), images and thread count; detect rows also run the network
# (backbone + FPN + heads) exported to ONNX in ONNX Runtime and OpenVINO (f32, and bf16 on
# the bf16 row: scripts/bench_runtimes.py, its own venv), the runtimes a user would deploy. Each row runs both implementations in
# alternating rounds (separate processes, so peak memory is per job) and reports the median of
# the per-round ratios. Run it on an idle machine: anything else on the cores skews both.
# Usage: scripts/bench.sh [THREADS] [ROUNDS] [RUNS_PER_ROUND]
# With BENCH_BEFORE=PATH (an `examples/bench` binary built from an earlier commit), each round
# also runs that binary, and the table gains its time and its ratio to ours: an A/B of a change
# on the same machine, in the same run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads="${1:-2}"
rounds="${2:-3}"
runs="${3:-3}"
py="$(bash scripts/venv.sh)"
rpy="$(bash scripts/venv.sh scripts/requirements-runtimes.txt)"
fixtures="${RETINANET_FIXTURES:-$PWD/target/fixtures}"
weights="$fixtures/parity/v1_r50_coco/model.safetensors"
[ -f "$weights" ] || { echo "missing $weights: run bash scripts/test.sh first" >&2; exit 1; }
mkdir -p target/bench
image=target/bench/person_640x480.png
square=target/bench/person_512x512.png
# A 640×480 photo (resized to 800×1066, padded 800×1088) and a 512×512 one (min/max 512).
"$py" - <<PY
from PIL import Image
im = Image.open('../shared/data/photos/darknet_person.jpg').convert('RGB')
im.resize((640, 480), Image.BILINEAR).save('$image')
im.resize((512, 512), Image.BILINEAR).save('$square')
PY
cargo build --release --example bench -q
export RAYON_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads"
out=target/bench/results.jsonl
: > "$out"
run_row() { # name, args... (a name with "bf16" runs ours with bf16 products)
  local name="$1"; shift
  local extra=()
  [[ "$name" == *bf16* ]] && extra=(--bf16)
  for r in $(seq "$rounds"); do
    ours="$(./target/release/examples/bench --runs "$runs" "$@" "${extra[@]}")"
    theirs="$("$py" scripts/bench_torchvision.py --threads "$threads" --runs "$runs" "$@")"
    before=null
    if [ -n "${BENCH_BEFORE:-}" ]; then
      before="$("$BENCH_BEFORE" --runs "$runs" "$@" "${extra[@]}")"
    fi
    ort=null ov=null
    if [[ " $* " == *" --mode detect "* ]]; then
      local rt=("$rpy" scripts/bench_runtimes.py --threads "$threads" --runs "$runs" "$@")
      if [[ "$name" == *bf16* ]]; then
        ov="$("${rt[@]}" --runtime openvino --precision bf16)"
      else
        ort="$("${rt[@]}" --runtime onnxruntime)"
        ov="$("${rt[@]}" --runtime openvino --precision f32)"
      fi
    fi
    echo "{\"row\": \"$name\", \"round\": $r, \"ours\": $ours, \"theirs\": $theirs, \"before\": $before, \"ort\": $ort, \"ov\": $ov}" >> "$out"
  done
}
common=(--weights "$weights")
run_row "detect 800x1066, batch 1" "${common[@]}" --image "$image" --mode detect
if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  run_row "detect 800x1066, batch 1, ours bf16 (FPN + heads)" "${common[@]}" --image "$image" --mode detect
fi
run_row "detect 800x1066, batch 4" "${common[@]}" --image "$image" --mode detect --batch 4
run_row "detect 512x512, batch 1" "${common[@]}" --image "$square" --mode detect --min-size 512 --max-size 512
run_row "detect 512x512, batch 4" "${common[@]}" --image "$square" --mode detect --min-size 512 --max-size 512 --batch 4
run_row "train step, batch 2, 512x512" "${common[@]}" --image "$square" --mode train --min-size 512 --max-size 512 --batch 2
run_row "post-processing alone, 800x1066" "${common[@]}" --image "$image" --mode postprocess
run_row "sgemm 2048^3 (peak)" --mode matmul
macs="$("$py" scripts/bench_torchvision.py --mode macs "${common[@]}" --image "$image" --runs 1 --warmup 0)"
"$py" - "$out" "$macs" "$threads" <<'PY'
import json, statistics, sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["row"], []).append(r)
macs = json.loads(sys.argv[2])["macs"]
print(f"threads: {sys.argv[3]}; convolution MACs of one 800x1066 detect: {macs / 1e9:.1f} G")
ab = all(r["before"] is not None for rs in rows.values() for r in rs)
print("| job | ours ms | torchvision ms | ours/torchvision (median of rounds) | ours peak MB | torchvision peak MB |"
      " ONNX Runtime ms (network) | OpenVINO ms (network) | ours/OpenVINO | ONNX Runtime, OpenVINO peak MB |"
      + (" before ms | ours/before | before peak MB |" if ab else ""))
print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if ab else ""))
gemm, det = {}, None
for name, rs in rows.items():
    o = statistics.median(r["ours"]["ms_median"] for r in rs)
    t = statistics.median(r["theirs"]["ms_median"] for r in rs)
    ratio = statistics.median(r["ours"]["ms_median"] / r["theirs"]["ms_median"] for r in rs)
    om = max(r["ours"]["peak_rss_mb"] for r in rs)
    tm = max(r["theirs"]["peak_rss_mb"] for r in rs)
    line = f"| {name} | {o:.1f} | {t:.1f} | {ratio:.2f} | {om:.0f} | {tm:.0f} |"
    peer = lambda k: [r[k] for r in rs if r.get(k)]
    ort, ov = peer("ort"), peer("ov")
    med = lambda xs: f"{statistics.median(x['ms_median'] for x in xs):.1f}" if xs else "–"
    vs_ov = (f"{statistics.median(r['ours']['ms_median'] / r['ov']['ms_median'] for r in rs if r.get('ov')):.2f}"
             if ov else "–")
    mem = ", ".join(f"{max(x['peak_rss_mb'] for x in xs):.0f}" if xs else "–" for xs in (ort, ov))
    line += f" {med(ort)} | {med(ov)} | {vs_ov} | {mem} |"
    if ab:
        b = statistics.median(r["before"]["ms_median"] for r in rs)
        vs = statistics.median(r["ours"]["ms_median"] / r["before"]["ms_median"] for r in rs)
        bm = max(r["before"]["peak_rss_mb"] for r in rs)
        line += f" {b:.1f} | {vs:.3f} | {bm:.0f} |"
    print(line)
    if name.startswith("sgemm"):
        gemm = {"ours": 2 * 2048**3 / o / 1e6, "theirs": 2 * 2048**3 / t / 1e6}
    if name == "detect 800x1066, batch 1":
        det = (o, t)
if gemm and det:
    o, t = det
    print(f"sgemm peak: ours {gemm['ours']:.0f} GFLOP/s, torchvision {gemm['theirs']:.0f} GFLOP/s")
    print(f"detect 800x1066 (direct-conv FLOPs / time): ours {2 * macs / o / 1e6:.0f} GFLOP/s "
          f"({2 * macs / o / 1e6 / gemm['ours'] * 100:.0f}% of our gemm peak), torchvision "
          f"{2 * macs / t / 1e6:.0f} GFLOP/s ({2 * macs / t / 1e6 / gemm['theirs'] * 100:.0f}% of its peak)")
PY
