#!/usr/bin/env python3
"""Writes torchvision training references that tests/train_parity.rs compares against.

For a v1 (L1 box loss) and a v2 (GIoU box loss) RetinaNet on a ResNet-18 with frozen batch
norm (calibrated on photos) and torchvision's own head initialisation, on a batch of three
small photos (one without boxes, boxes of many sizes so that anchors fall on both sides of the
0.4 / 0.5 IoU thresholds, and a box too small for any anchor to reach 0.4, which only
low-quality matching assigns), it records:

- the resized targets and the matcher's assignment of every anchor;
- the classification and box losses, the gradients of the head outputs, of `cls_logits`,
  `bbox_reg`, an FPN conv and a backbone conv;
- the losses before each of three SGD steps and after the last, and selected weights after
  them;
- all of it twice: in float32, and in float64 on the same input and assignment. Gradients deep
  in the network are sums with heavy cancellation, whose float32 rounding error (torchvision's
  own, measured against float64) reaches 1e-3 relative; float64 checks them to 1e-4 (lr 0.01, momentum 0.9,
  weight decay 1e-4) with torchvision's default `trainable_backbone_layers=3`.

It also records torch.optim.SGD on a toy parameter (momentum, weight decay, nesterov,
gradient-norm clipping) and torchvision's sigmoid focal loss and its gradient on extreme logits.

Usage: make_train_fixtures.py [OUT_DIR]   (default: target/fixtures/train)
"""
import copy
import json
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_common import PHOTOS, device, save_file  # noqa: E402

# Where torchvision computes the references (main() sets it; see fixture_common).
DEVICE = torch.device("cpu")

ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 3
MIN_SIZE, MAX_SIZE = 160, 256
LR, MOMENTUM, WEIGHT_DECAY, STEPS = 0.01, 0.9, 1e-4, 3
CONFIGS = [dict(name="v1_r18", version=1, loss="l1"), dict(name="v2_r18", version=2, loss="giou")]
CALIBRATION = ["grace_hopper.jpg", "rocket.jpg", "darknet_person.jpg"]

# Boxes in original-image pixels (x1, y1, x2, y2) and labels.
IMAGES = [
    ("chelsea.png", [[140.0, 20.5, 330.0, 280.0], [20.0, 200.0, 90.0, 262.0], [400.0, 10.0, 411.0, 19.0],
                     [200.25, 150.0, 260.75, 210.0]], [1, 2, 0, 0]),
    ("coffee.png", [], []),
    ("astronaut.png", [[150.0, 20.0, 330.0, 230.0], [0.0, 0.0, 512.0, 512.0], [300.0, 300.0, 340.0, 331.0],
                       [60.0, 380.0, 190.0, 420.0], [10.0, 100.0, 30.0, 300.0]], [0, 2, 1, 1, 2]),
]
# Tensors whose gradients (first step) and weights (before and after the last step) are recorded.
WATCHED = [
    "head.classification_head.cls_logits.weight",
    "head.classification_head.cls_logits.bias",
    "head.regression_head.bbox_reg.weight",
    "head.regression_head.bbox_reg.bias",
    "backbone.fpn.layer_blocks.0.0.weight",
    "backbone.fpn.inner_blocks.1.0.bias",
    "backbone.body.layer2.0.conv1.weight",
]


def load_image(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def build(cfg, norm_layer):
    backbone = resnet18(weights=None, norm_layer=norm_layer)
    extra = LastLevelP6P7(256, 256) if cfg["version"] == 1 else LastLevelP6P7(512, 256)
    backbone = _resnet_fpn_extractor(backbone, 3, returned_layers=[2, 3, 4], extra_blocks=extra)
    head_norm = None if cfg["version"] == 1 else partial(nn.GroupNorm, 32)
    head = RetinaNetHead(256, 9, NUM_CLASSES, norm_layer=head_norm)
    head.regression_head._loss_type = cfg["loss"]
    return RetinaNet(backbone, NUM_CLASSES, min_size=MIN_SIZE, max_size=MAX_SIZE, head=head)


@torch.no_grad()
def calibrated(cfg, calib, gen):
    """A model with frozen batch norm whose statistics come from real photos, so activations
    have realistic scales; everything else keeps torchvision's initialisation."""
    model = build(cfg, nn.BatchNorm2d)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            m.reset_running_stats()
            m.momentum = None
        if isinstance(m, nn.GroupNorm):
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    model.eval()
    model.backbone.body.train()
    batch = model.transform(calib)[0].tensors
    for i in range(batch.shape[0]):
        model.backbone.body(batch[i : i + 1])
    frozen = build(cfg, FrozenBatchNorm2d)
    missing, unexpected = frozen.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(u.endswith("num_batches_tracked") for u in unexpected)
    return frozen


def matched_idxs(model, targets, anchors):
    out = []
    for a, t in zip(anchors, targets):
        if t["boxes"].numel() == 0:
            out.append(torch.full((a.shape[0],), -1, dtype=torch.int64))
        else:
            out.append(model.proposal_matcher(box_ops.box_iou(t["boxes"], a)))
    return torch.stack(out)


class F32Transform(nn.Module):
    """Runs the (float32) transform and hands its output on as float64, so that a float64
    model sees exactly the input and resized boxes of the float32 run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets]
        image_list, targets = self.inner([i.float() for i in images], targets)
        if targets is not None:
            targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets]
        return ImageList(image_list.tensors.double(), image_list.image_sizes), targets


def run(model, images, targets, dtype):
    """Losses, gradients and three SGD steps of `model` in `dtype`. In float64 the anchor
    assignment is still computed in float32, so that both runs train the same anchors."""
    model = copy.deepcopy(model).to(DEVICE, dtype)
    images = [i.to(DEVICE) for i in images]
    targets = [{k: v.to(DEVICE) for k, v in t.items()} for t in targets]
    if dtype == torch.float64:
        model.transform = F32Transform(model.transform)
    captured = {}

    def compute_loss(targets_, head_outputs, anchors):
        for key in ("cls_logits", "bbox_regression"):
            head_outputs[key].retain_grad()
        captured.update(targets=targets_, head=head_outputs, anchors=anchors)
        matched = matched_idxs(model, [{"boxes": t["boxes"].float()} for t in targets_],
                               [a.float() for a in anchors])
        return model.head.compute_loss(targets_, head_outputs, anchors, list(matched))

    model.compute_loss = compute_loss
    model.train()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR,
                          momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    out = {}
    losses = []
    for step in range(STEPS + 1):
        opt.zero_grad()
        loss = model([i.clone().to(dtype) for i in images],
                     [{"boxes": t["boxes"].to(dtype), "labels": t["labels"]} for t in targets])
        total = loss["classification"] + loss["bbox_regression"]
        losses.append([loss["classification"].item(), loss["bbox_regression"].item()])
        if step == STEPS:
            break
        total.backward()
        if step == 0:
            for name in WATCHED:
                out[f"grad.{name}"] = params[name].grad.clone()
                out[f"step0.{name}"] = params[name].detach().clone()
            out["grad.cls_logits_out"] = captured["head"]["cls_logits"].grad.clone()
            out["grad.bbox_regression_out"] = captured["head"]["bbox_regression"].grad.clone()
            out["cls_logits_out"] = captured["head"]["cls_logits"].detach().clone()
            out["bbox_regression_out"] = captured["head"]["bbox_regression"].detach().clone()
            out["anchors"] = captured["anchors"][0].clone()
            anchors = [a.float() for a in captured["anchors"]]
            out["matched_idxs"] = matched_idxs(model, captured["targets"], anchors)
            for i, t in enumerate(captured["targets"]):
                out[f"target{i}_boxes"] = t["boxes"].reshape(-1, 4).float().clone()
        opt.step()
    for name in WATCHED:
        out[f"step{STEPS}.{name}"] = params[name].detach().clone()
    return out, losses


def record_model(cfg, out_dir, calib, images, targets, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    model = calibrated(cfg, calib, gen)
    d = out_dir / cfg["name"]
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, d / "model.safetensors", metadata={"bn_eps": "1e-05"})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    out, losses = run(model, images, targets, torch.float32)
    out64, losses64 = run(model, images, targets, torch.float64)
    assert torch.equal(out["matched_idxs"], out64["matched_idxs"])
    for i in range(len(images)):
        assert torch.equal(out[f"target{i}_boxes"], out64[f"target{i}_boxes"])
    out.update({f"f64.{k}": v for k, v in out64.items() if v.is_floating_point()})
    save_file(out, d / "expected.safetensors")
    m = out["matched_idxs"]
    counts = {
        "foreground": [int((r >= 0).sum()) for r in m],
        "ignored": [int((r == -2).sum()) for r in m],
    }
    return {
        "name": cfg["name"],
        "version": cfg["version"],
        "box_loss": cfg["loss"],
        # [classification, box] before each step and after the last, float32 and float64.
        "losses": losses,
        "losses_f64": losses64,
        "trainable": trainable,
        "watched": WATCHED,
        "counts": counts,
    }


def record_sgd(out_dir):
    """torch.optim.SGD on one parameter over six steps with changing gradients."""
    gen = torch.Generator().manual_seed(7)
    p0 = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) * (i + 1) for i in range(6)]
    out = {"p0": p0}
    cases = {
        "plain": dict(momentum=0.0, weight_decay=0.0, nesterov=False, clip=None),
        "momentum_wd": dict(momentum=0.9, weight_decay=1e-4, nesterov=False, clip=None),
        "nesterov": dict(momentum=0.9, weight_decay=1e-2, nesterov=True, clip=None),
        "clipped": dict(momentum=0.9, weight_decay=1e-4, nesterov=False, clip=3.0),
    }
    lrs = [0.1, 0.1, 0.05, 0.05, 0.01, 0.01]
    for i, g in enumerate(grads):
        out[f"g{i}"] = g
    for name, c in cases.items():
        p = nn.Parameter(p0.clone())
        opt = torch.optim.SGD([p], lr=lrs[0], momentum=c["momentum"], weight_decay=c["weight_decay"],
                              nesterov=c["nesterov"])
        for i, g in enumerate(grads):
            for group in opt.param_groups:
                group["lr"] = lrs[i]
            p.grad = g.clone()
            if c["clip"] is not None:
                torch.nn.utils.clip_grad_norm_([p], c["clip"])
            opt.step()
            out[f"{name}.p{i + 1}"] = p.detach().clone()
    save_file(out, out_dir / "sgd.safetensors")
    return {"lrs": lrs, "cases": cases}


def record_focal(out_dir):
    """Focal loss and its gradient, elementwise, on logits up to ±200 with 0/1 targets."""
    x = torch.tensor([-200.0, -60.0, -20.0, -3.0, -0.5, 0.0, 0.5, 3.0, 20.0, 60.0, 200.0])
    x = torch.cat([x, x]).requires_grad_(True)
    t = torch.cat([torch.zeros(11), torch.ones(11)])
    out = {"x": x.detach().clone(), "t": t}
    for name, (alpha, gamma) in {"default": (0.25, 2.0), "a05_g1_5": (0.5, 1.5)}.items():
        x.grad = None
        loss = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)
        loss.sum().backward()
        out[f"{name}.loss"] = loss.detach().clone()
        out[f"{name}.grad"] = x.grad.clone()
    save_file(out, out_dir / "focal.safetensors")


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "fixtures" / "train")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    global DEVICE
    DEVICE = device()
    calib = [load_image(PHOTOS / n) for n in CALIBRATION]
    images = [load_image(PHOTOS / n) for n, _, _ in IMAGES]
    targets = [
        {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(l, dtype=torch.int64)}
        for _, b, l in IMAGES
    ]
    models = [record_model(cfg, out_dir, calib, images, targets, seed) for seed, cfg in enumerate(CONFIGS)]
    sgd = record_sgd(out_dir)
    record_focal(out_dir)
    meta = {
        "num_classes": NUM_CLASSES,
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        "lr": LR,
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "steps": STEPS,
        "images": [str(PHOTOS / n) for n, _, _ in IMAGES],
        "boxes": [b for _, b, _ in IMAGES],
        "labels": [l for _, _, l in IMAGES],
        "models": models,
        "sgd": sgd,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    for m in models:
        print(f"{m['name']}: losses {m['losses']}, anchors {m['counts']}", flush=True)


if __name__ == "__main__":
    main()
