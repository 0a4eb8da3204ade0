#!/usr/bin/env bash
# Tiled prediction on a large raster: our `detect --tile 400` against deepforest 2.1.0's
# `predict_tile(patch_size=400)` on the same weights (the DeepForest fixture repo, a ResNet-50
# RetinaNet like weecology/deepforest-tree), the same GeoTIFF and the same thread count, one after
# the other; wall time and peak memory (max RSS) of each whole process, from GNU time. Run it on
# an idle machine: anything else on the cores skews both.
# Usage: scripts/bench_tile.sh [THREADS] [SIDE_PX]   (defaults: 2 threads, a 4000 px square)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads="${1:-2}"
side="${2:-4000}"
dfpy="$(bash scripts/venv.sh scripts/requirements-deepforest.txt)"
fixtures="${RETINANET_FIXTURES:-$PWD/target/fixtures}"
repo="$fixtures/deepforest/repo"
[ -f "$repo/model.safetensors" ] || { echo "missing $repo: run bash scripts/test.sh first" >&2; exit 1; }
out=target/bench/tile
mkdir -p "$out"
raster="$out/raster_${side}.tif"
# A large tiled GeoTIFF of real imagery: the YELL crop mirrored out to SIDE×SIDE.
[ -f "$raster" ] || "$dfpy" - "$raster" "$side" <<'PY'
import sys
import numpy as np, rasterio
from PIL import Image
from rasterio.transform import from_origin
path, side = sys.argv[1], int(sys.argv[2])
im = np.array(Image.open("../shared/data/deepforest-trees/train/2019_YELL_2_541000_4977000_image_crop.png").convert("RGB"))
reps = (side // im.shape[0] + 1, side // im.shape[1] + 1, 1)
big = np.tile(np.concatenate([im, im[::-1]], 0), (reps[0], reps[1], 1))[:side, :side]
with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8",
                   crs="EPSG:32612", transform=from_origin(541000, 4978000, 0.1, 0.1),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
    for i in range(3):
        dst.write(big[..., i], i + 1)
PY
# The repo in a Hub cache, as a download would leave it, read offline.
commit=0000000000000000000000000000000000000000
cache="$out/hf/hub/models--bench--deepforest"
mkdir -p "$cache/refs" "$cache/snapshots/$commit"
printf %s "$commit" > "$cache/refs/main"
cp "$repo/config.json" "$repo/model.safetensors" "$cache/snapshots/$commit/"
cargo build --release --example detect -q
export RAYON_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
measure() { # label, command...
  local label="$1"; shift
  /usr/bin/time -f "$label: %e s wall, %M KB peak RSS" "$@" > /dev/null 2> "$out/$label.log" || {
    cat "$out/$label.log" >&2; exit 1; }
  tail -n 1 "$out/$label.log"
}
echo "raster: $raster (${side}x${side}), windows of 400 px, overlap 0.05, $threads threads"
measure ours env HF_HOME="$out/hf" HF_HUB_OFFLINE=1 ./target/release/examples/detect \
  --model hf:bench/deepforest --tile 400 --csv "$out/ours.csv" "$raster"
measure deepforest "$dfpy" - "$repo" "$raster" "$out/deepforest.csv" "$threads" <<'PY'
import json, sys
from functools import partial
import torch, torchvision
torch.set_num_threads(int(sys.argv[4]))
f = torchvision.models.detection.retinanet_resnet50_fpn
torchvision.models.detection.retinanet_resnet50_fpn = partial(f, weights_backbone=None)
from deepforest import main
cfg = json.load(open(sys.argv[1] + "/config.json"))  # the repo's thresholds, as ours reads them
m = main.deepforest(config_args={"model": {"name": sys.argv[1]}, "accelerator": "cpu",
                                 "devices": 1, "score_thresh": cfg["score_thresh"],
                                 "nms_thresh": cfg["nms_thresh"], "log_root": "target/bench/tile/logs"})
df = m.predict_tile(path=sys.argv[2], patch_size=400, patch_overlap=0.05, iou_threshold=0.15)
df[["xmin", "ymin", "xmax", "ymax", "label", "score", "image_path"]].to_csv(sys.argv[3], index=False)
PY
echo "boxes: ours $(($(wc -l < "$out/ours.csv") - 1)), deepforest $(($(wc -l < "$out/deepforest.csv") - 1))"
