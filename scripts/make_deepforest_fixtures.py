#!/usr/bin/env python3
"""Writes the DeepForest reference fixtures: a Hub repo made by deepforest 2.1.0's own
`RetinaNetHub.save_pretrained`, `predict_tile` outputs on a real aerial image, its window
placement, and GeoTIFFs of the same pixels with a known geotransform and CRS (rasterio).

Nothing is downloaded: the ResNet-50 that `RetinaNetHub` builds would fetch ImageNet weights
(torchvision's default `weights_backbone`), so the constructor is called with none; the weights
are random but lively (batch norm calibrated on the image, He-initialised head, class biases
chosen so that every window has candidates above the score threshold).

Usage: make_deepforest_fixtures.py [OUT_DIR]   (default: target/fixtures/deepforest)
Run with the venv of scripts/requirements-deepforest.txt.
"""
import json
import math
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import rasterio
import slidingwindow
import torch
import torchvision
from PIL import Image
from rasterio.transform import from_origin
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
TREES = ROOT.parent / "shared" / "data" / "deepforest-trees" / "train"
SOURCE = TREES / "2019_YELL_2_541000_4977000_image_crop.png"
# An odd-sized crop several 400 px windows wide (DeepForest's default patch size).
CROP = (40, 60, 40 + 1001, 60 + 747)
LABELS = {"Tree": 0, "Snag": 1}
SCORE_THRESH = 0.3
NMS_THRESH = 0.05
# Tiled runs: (patch_size, patch_overlap, iou_threshold); the first is predict_tile's default.
RUNS = [(400, 0.05, 0.15), (300, 0.25, 0.3)]
# Window placements only (no model): (width, height, patch_size, overlap).
WINDOW_CASES = [(1001, 747, 400, 0.05), (1001, 747, 300, 0.25), (399, 1200, 400, 0.1),
                (2299, 2472, 400, 0.05), (5000, 401, 512, 0.5), (400, 400, 400, 0.05),
                (1249, 1035, 800, 0.0)]
# UTM zone 12N (site YELL), 10 cm pixels.
EPSG = 32612
ORIGIN = (541040.0, 4977940.0)
PIXEL = 0.1

# Offline construction: no ImageNet backbone download (the weights are replaced anyway).
_resnet_fpn = torchvision.models.detection.retinanet_resnet50_fpn
torchvision.models.detection.retinanet_resnet50_fpn = partial(_resnet_fpn, weights_backbone=None)

from deepforest import main  # noqa: E402  (after the patch)
from deepforest.models.retinanet import RetinaNetHub  # noqa: E402


def load_chw(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@torch.no_grad()
def randomise(model, windows, gen):
    """Lively random weights (as scripts/make_parity_fixtures.py makes them)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            m.reset_running_stats()
            m.momentum = None
    for head in (model.head.classification_head, model.head.regression_head):
        for m in head.conv.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / (9 * m.in_channels)), generator=gen)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
    model.eval()
    model.backbone.body.train()
    batch = model.transform(windows)[0].tensors
    for i in range(batch.shape[0]):
        model.backbone.body(batch[i : i + 1])
    model.eval()

    features = list(model.backbone(batch).values())
    cls, reg = model.head.classification_head, model.head.regression_head
    trunk_cls = [cls.conv(f) for f in features]
    trunk_reg = [reg.conv(f) for f in features]
    nn.init.normal_(reg.bbox_reg.weight, std=1.0, generator=gen)
    reg.bbox_reg.bias.zero_()
    raw = torch.cat([reg.bbox_reg(t).flatten() for t in trunk_reg])
    reg.bbox_reg.weight.mul_(0.2 / raw.std())
    nn.init.normal_(cls.cls_logits.weight, std=1.0, generator=gen)
    cls.cls_logits.bias.zero_()
    logits = torch.cat([cls.cls_logits(t).flatten() for t in trunk_cls])
    cls.cls_logits.weight.div_(logits.std())
    # About 0.3 % of anchor-class pairs above the score threshold.
    k = len(LABELS)
    q = float(torch.quantile((logits / logits.std())[:: 7], 0.997))
    bias = torch.full((9, k), math.log(SCORE_THRESH / (1 - SCORE_THRESH)) - q)
    bias[:, 1] -= 0.7  # the second class rarer
    cls.cls_logits.bias.copy_(bias.flatten())


def windows_of(width, height, size, overlap):
    ws = slidingwindow.generateForSize(width, height, slidingwindow.DimOrder.ChannelHeightWidth,
                                       size, overlap)
    return [list(w.getRect()) for w in ws]


def predict_tile(repo, image_path, size, overlap, iou, log_root):
    m = main.deepforest(config_args={
        "model": {"name": str(repo), "revision": "main"},
        "score_thresh": SCORE_THRESH, "nms_thresh": NMS_THRESH,
        "accelerator": "cpu", "devices": 1, "log_root": str(log_root),
    })
    df = m.predict_tile(path=str(image_path), patch_size=size, patch_overlap=overlap,
                        iou_threshold=iou)
    return [dict(xmin=float(r.xmin), ymin=float(r.ymin), xmax=float(r.xmax), ymax=float(r.ymax),
                 label=str(r.label), score=float(r.score)) for r in df.itertuples()]


def write_geotiffs(rgb, out):
    transform = from_origin(ORIGIN[0], ORIGIN[1], PIXEL, PIXEL)
    h, w, _ = rgb.shape
    common = dict(driver="GTiff", width=w, height=h, dtype="uint8", crs=f"EPSG:{EPSG}",
                  transform=transform)
    variants = {
        "tiled_deflate.tif": dict(count=3, tiled=True, blockxsize=256, blockysize=256,
                                  compress="deflate"),
        "striped_rgba_lzw.tif": dict(count=4, tiled=False, blockysize=16, compress="lzw",
                                     photometric="RGB"),
        "striped_raw.tif": dict(count=3, tiled=False, blockysize=7),
    }
    for name, opts in variants.items():
        bands = [rgb[..., i] for i in range(3)]
        if opts["count"] == 4:
            bands.append(np.full((h, w), 255, np.uint8))
        with rasterio.open(out / name, "w", **common, **opts) as dst:
            for i, band in enumerate(bands):
                dst.write(band, i + 1)
    with rasterio.open(out / "tiled_deflate.tif") as src:
        assert src.crs.to_epsg() == EPSG
        geo = dict(epsg=EPSG, transform=list(src.transform)[:6], files=sorted(variants))
    (out / "geo.json").write_text(json.dumps(geo, indent=1))


def main_():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "fixtures" / "deepforest"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)

    rgb = np.array(Image.open(SOURCE).convert("RGB").crop(CROP))
    Image.fromarray(rgb).save(out / "image.png")
    write_geotiffs(rgb, out)

    model = RetinaNetHub(num_classes=len(LABELS), score_thresh=SCORE_THRESH,
                         nms_thresh=NMS_THRESH, label_dict=LABELS)
    calib = [load_chw(rgb[y : y + 400, x : x + 400]) for x, y in [(0, 0), (500, 300)]]
    randomise(model, calib, gen)
    repo = out / "repo"
    model.save_pretrained(repo)

    # The legacy layout (every tensor under `model.`), which from_pretrained still accepts.
    legacy = out / "repo_legacy"
    legacy.mkdir(exist_ok=True)
    shutil.copy(repo / "config.json", legacy / "config.json")
    state = load_file(repo / "model.safetensors")
    save_file({f"model.{k}": v for k, v in state.items()}, legacy / "model.safetensors")
    window = [load_chw(rgb[:400, :400])]
    with torch.no_grad():
        a = RetinaNetHub.from_pretrained(str(repo)).eval()(window)[0]
        b = RetinaNetHub.from_pretrained(str(legacy)).eval()(window)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and len(a["boxes"]) > 0, "legacy repo differs"

    log_root = out / "logs"
    runs = []
    for size, overlap, iou in RUNS:
        boxes = predict_tile(repo, out / "image.png", size, overlap, iou, log_root)
        print(f"predict_tile {size}/{overlap}/{iou}: {len(boxes)} boxes", file=sys.stderr)
        runs.append(dict(patch_size=size, patch_overlap=overlap, iou_threshold=iou,
                         windows=windows_of(rgb.shape[1], rgb.shape[0], size, overlap),
                         boxes=boxes))
    shutil.rmtree(log_root, ignore_errors=True)
    windows = [dict(width=w, height=h, patch_size=s, patch_overlap=o, windows=windows_of(w, h, s, o))
               for w, h, s, o in WINDOW_CASES]
    (out / "predict_tile.json").write_text(json.dumps(dict(runs=runs, window_cases=windows)))


if __name__ == "__main__":
    main_()
