#!/usr/bin/env python3
"""Times one job of the CPU benchmark with torchvision and prints a JSON line (the counterpart
of examples/bench.rs; scripts/bench.sh runs both).

Modes: detect (transform + network + post-processing for a batch of copies of the image),
train (one SGD step with torchvision's default 3 trainable backbone layers, two boxes per image),
postprocess (post-processing alone), matmul (a 2048^3 f32 product: the sgemm peak), macs (count
the convolution multiply-accumulates of one detect, with forward hooks).
The weights and architecture are those of a parity fixture (scripts/make_parity_fixtures.py).
"""
import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_parity_fixtures as fx  # noqa: E402
from fixture_common import load_file  # noqa: E402


def sync():
    """Waits for queued GPU work (CUDA runs asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast():
    """`--autocast fp16|bf16`: torch.autocast on the run's device; otherwise nothing."""
    if ARGS.autocast == "none":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[ARGS.autocast]
    return torch.autocast(torch.device(ARGS.device).type, dtype=dtype)


def load_model(weights, config, min_size, max_size):
    cfg = dict(next(c for c in fx.CONFIGS if c["name"] == config))
    cfg["size"] = (min_size, max_size)
    model = fx.build(cfg, FrozenBatchNorm2d if cfg["version"] == 1 else torch.nn.BatchNorm2d)
    model.load_state_dict(load_file(weights), strict=False)
    if cfg["version"] == 1:
        overwrite_eps(model, cfg["eps"])
    return model.eval()


def timed(fn, warmup, runs):
    for _ in range(warmup):
        with autocast():
            fn()
        sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        with autocast():
            fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def count_macs(model, images):
    macs = []

    def hook(m, inp, out):
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        macs.append(out.numel() * k)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(images)
    for h in handles:
        h.remove()
    return sum(macs)


def time_train(model, images):
    """One SGD step per run (the boxes match examples/bench.rs)."""
    torch.set_grad_enabled(True)
    for name, p in model.named_parameters():
        # torchvision's trainable_backbone_layers=3: layer2..4 train, stem and layer1 frozen.
        frozen = name.startswith("backbone.body.") and not any(
            name.startswith(f"backbone.body.layer{i}") for i in (2, 3, 4))
        p.requires_grad_(not frozen)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    h, w = images[0].shape[1:]
    box = torch.tensor([[0.1 * w, 0.2 * h, 0.45 * w, 0.9 * h], [0.5 * w, 0.1 * h, 0.95 * w, 0.6 * h]])
    dev = images[0].device
    targets = [{"boxes": box.clone().to(dev), "labels": torch.tensor([1, 3], device=dev)} for _ in images]

    def step():
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, 1, ARGS.runs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights")
    p.add_argument("--config", default="v1_r50_coco")
    p.add_argument("--image")
    p.add_argument("--mode", default="detect")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--autocast", default="none", choices=["none", "fp16", "bf16"])
    a = p.parse_args()
    global ARGS
    ARGS = a
    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    result = {"impl": f"torchvision {torchvision.__version__}", "mode": a.mode, "batch": a.batch,
              "min_size": a.min_size, "device": a.device, "autocast": a.autocast}
    grad_mode = torch.enable_grad() if a.mode == "train" else torch.inference_mode()
    with grad_mode:
        if a.mode == "matmul":
            x, y = torch.randn(2048, 2048, device=a.device), torch.randn(2048, 2048, device=a.device)
            times = timed(lambda: x @ y, a.warmup, a.runs)
        else:
            model = load_model(a.weights, a.config, a.min_size, a.max_size).to(a.device)
            img = torch.from_numpy(np.array(Image.open(a.image).convert("RGB"))).permute(2, 0, 1).float() / 255.0
            img = img.to(a.device)
            images = [img] * a.batch
            if a.mode == "detect":
                times = timed(lambda: model(images), a.warmup, a.runs)
            elif a.mode == "train":
                times = time_train(model, images)
            elif a.mode == "macs":
                result["macs"] = count_macs(model, images)
                times = [0.0]
            elif a.mode == "postprocess":
                image_list, _ = model.transform(images)
                features = list(model.backbone(image_list.tensors).values())
                head = model.head(features)
                anchors = model.anchor_generator(image_list, features)
                hw = [f.size(2) * f.size(3) for f in features]
                a_per = head["cls_logits"].size(1) // sum(hw)
                split_head = {k: list(v.split([n * a_per for n in hw], dim=1)) for k, v in head.items()}
                split_anchors = [list(x.split([n * a_per for n in hw])) for x in anchors]
                times = timed(lambda: model.postprocess_detections(split_head, split_anchors, image_list.image_sizes),
                              a.warmup, a.runs)
            else:
                raise SystemExit(f"unknown --mode {a.mode}")
    result.update({"ms_median": statistics.median(times), "ms_all": times,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
