#!/usr/bin/env bash
# Side-by-side timing of our detect and torchvision's on the same weights, image and thread
# count (2 by default). Run on an idle machine: anything else on the cores skews both.
# Usage: scripts/bench.sh [THREADS] [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads="${1:-2}"
runs="${2:-7}"
py="$(bash scripts/venv.sh)"
fixtures="${RETINANET_FIXTURES:-$PWD/target/fixtures}"
weights="$fixtures/parity/v1_r50_coco/model.safetensors"
[ -f "$weights" ] || { echo "missing $weights: run bash scripts/test.sh first" >&2; exit 1; }
mkdir -p target/bench
image=target/bench/person_640x480.png
# A 640×480 photo: resized to 800×1066 and padded to 800×1088, as in the issue's benchmark.
"$py" -c "from PIL import Image; Image.open('../shared/data/photos/darknet_person.jpg').convert('RGB').resize((640, 480), Image.BILINEAR).save('$image')"
cargo build --release --example bench -q
ours="$(RAYON_NUM_THREADS=$threads ./target/release/examples/bench --weights "$weights" --image "$image" --runs "$runs")"
theirs="$(OMP_NUM_THREADS=$threads "$py" scripts/bench_torchvision.py --weights "$weights" --image "$image" --runs "$runs" --threads "$threads")"
echo "$ours"
echo "$theirs"
"$py" - "$ours" "$theirs" "$threads" <<'PY'
import json, sys
o, t, n = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"| detect R50-FPN v1, 640x480 -> 800x1088, {n} threads | ms/image (median) |")
print("|---|---|")
print(f"| {o['impl']} | {o['ms_median']:.0f} (network {o['ms_network_median']:.0f}, post-processing {o['ms_postprocess_median']:.1f}) |")
print(f"| {t['impl']} | {t['ms_median']:.0f} |")
print(f"| ratio ours/torchvision | {o['ms_median'] / t['ms_median']:.2f} |")
PY
