#!/usr/bin/env python3
"""Times torchvision's RetinaNet on one image: median ms over several runs after a warm-up.

Usage: bench_torchvision.py --weights DIR/model.safetensors --config v1_r50_coco --image I
The weights and architecture are those of a parity fixture (scripts/make_parity_fixtures.py).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_parity_fixtures as fx  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True)
    p.add_argument("--config", default="v1_r50_coco")
    p.add_argument("--image", required=True)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = dict(next(c for c in fx.CONFIGS if c["name"] == a.config))
    cfg["size"] = (800, 1333)
    model = fx.build(cfg, FrozenBatchNorm2d if cfg["version"] == 1 else torch.nn.BatchNorm2d)
    model.load_state_dict(load_file(a.weights), strict=False)
    if cfg["version"] == 1:
        overwrite_eps(model, cfg["eps"])
    model.eval()
    img = torch.from_numpy(np.array(Image.open(a.image).convert("RGB"))).permute(2, 0, 1).float() / 255.0
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.runs):
            t0 = time.perf_counter()
            out = model([img])
            dt = (time.perf_counter() - t0) * 1e3
            if i >= a.warmup:
                times.append(dt)
    print(json.dumps({"impl": f"torchvision {__import__('torchvision').__version__}",
                      "ms_median": statistics.median(times), "ms_all": times,
                      "detections": int(out[0]["boxes"].shape[0])}))


if __name__ == "__main__":
    main()
