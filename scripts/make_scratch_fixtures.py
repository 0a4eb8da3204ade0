#!/usr/bin/env python3
"""Writes torchvision references for training from scratch, which tests/train_scratch_parity.rs
compares against.

torchvision's `retinanet_resnet50_fpn` without weights uses `nn.BatchNorm2d` (in training mode
while training: batch statistics, running statistics updated with momentum 0.1) and trains all
five backbone stages, stem included. This builds the same on a ResNet-18 (v1 layout, 3 classes)
with torchvision's own random initialisation (seed 0), saves it as safetensors so that the Rust
side starts from the same weights, and on a batch of two small photos (one without boxes)
records, in float32 and in float64 (the anchor assignment computed in float32 in both):

- the classification and box losses before each of three SGD steps (lr 0.01, momentum 0.9,
  weight decay 1e-4 on every parameter, as `torch.optim.SGD(model.parameters())`) and after
  the last;
- the gradients, at the first step, of head, FPN and backbone tensors, the stem convolution
  and several batch-norm weights and biases among them, and those tensors after the steps;
- the running means and variances of several batch norms after the three steps (three
  training forwards);
- the head outputs of the trained model in evaluation mode (running statistics).

Usage: make_scratch_fixtures.py [OUT_DIR]   (default: target/fixtures/train_scratch)
"""
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_train_fixtures import F32Transform, load_image, matched_idxs  # noqa: E402
from fixture_common import PHOTOS, device, save_file  # noqa: E402

# Where torchvision computes the references (main() sets it; see fixture_common).
DEVICE = torch.device("cpu")

ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 3
MIN_SIZE, MAX_SIZE = 128, 192
LR, MOMENTUM, WEIGHT_DECAY, STEPS = 0.01, 0.9, 1e-4, 3

# Boxes in original-image pixels (x1, y1, x2, y2) and labels; the second image has none.
IMAGES = [
    ("chelsea.png", [[140.0, 20.5, 330.0, 280.0], [20.0, 200.0, 90.0, 262.0], [200.25, 150.0, 260.75, 210.0]],
     [1, 2, 0]),
    ("coffee.png", [], []),
]
# Tensors whose gradients (first step) and values (before and after the steps) are recorded.
WATCHED = [
    "head.classification_head.cls_logits.weight",
    "head.regression_head.bbox_reg.weight",
    "backbone.fpn.layer_blocks.0.0.weight",
    "backbone.body.conv1.weight",
    "backbone.body.bn1.weight",
    "backbone.body.bn1.bias",
    "backbone.body.layer1.0.bn1.weight",
    "backbone.body.layer2.0.downsample.1.weight",
    "backbone.body.layer2.0.downsample.1.bias",
    "backbone.body.layer3.1.conv2.weight",
    "backbone.body.layer4.1.bn2.bias",
]
# Batch norms whose running statistics are recorded after the steps.
RUNNING = [
    "backbone.body.bn1",
    "backbone.body.layer1.0.bn2",
    "backbone.body.layer2.0.downsample.1",
    "backbone.body.layer4.1.bn2",
]


def build():
    """`retinanet_resnet50_fpn(weights=None, weights_backbone=None)` on a ResNet-18."""
    backbone = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, NUM_CLASSES, min_size=MIN_SIZE, max_size=MAX_SIZE)


def run(model, images, targets, dtype):
    """Three SGD steps of `model` in training mode in `dtype`, then its head outputs in
    evaluation mode."""
    model = copy.deepcopy(model).to(DEVICE, dtype)
    images = [i.to(DEVICE) for i in images]
    targets = [{k: v.to(DEVICE) for k, v in t.items()} for t in targets]
    if dtype == torch.float64:
        model.transform = F32Transform(model.transform)

    def compute_loss(targets_, head_outputs, anchors):
        matched = matched_idxs(model, [{"boxes": t["boxes"].float()} for t in targets_],
                               [a.float() for a in anchors])
        return model.head.compute_loss(targets_, head_outputs, anchors, list(matched))

    model.compute_loss = compute_loss
    model.train()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    out, losses = {}, []
    batch = lambda: ([i.clone().to(dtype) for i in images],
                     [{"boxes": t["boxes"].to(dtype), "labels": t["labels"]} for t in targets])
    for step in range(STEPS + 1):
        if step == STEPS:
            # After three training forwards, before the loss check's fourth.
            after_steps = {k: v.detach().clone() for k, v in buffers.items()}
            for bn in RUNNING:
                for stat in ("running_mean", "running_var"):
                    out[f"{bn}.{stat}"] = after_steps[f"{bn}.{stat}"]
        opt.zero_grad()
        loss = model(*batch())
        losses.append([loss["classification"].item(), loss["bbox_regression"].item()])
        if step == STEPS:
            break
        (loss["classification"] + loss["bbox_regression"]).backward()
        if step == 0:
            for name in WATCHED:
                out[f"grad.{name}"] = params[name].grad.clone()
                out[f"step0.{name}"] = params[name].detach().clone()
        opt.step()
    for name in WATCHED:
        out[f"step{STEPS}.{name}"] = params[name].detach().clone()
    # Evaluation mode: the running statistics normalise. The fourth forward above moved them
    # once more: restore those of the three steps, which the Rust trainer saves.
    with torch.no_grad():
        for key, value in after_steps.items():
            buffers[key].copy_(value)
    model.eval()
    out["eval.cls_logits"], out["eval.bbox_regression"] = eval_outputs(model, images, dtype)
    return out, losses


def eval_outputs(model, images, dtype):
    """Head outputs `(N, ΣHWA, K)` and `(N, ΣHWA, 4)` in evaluation mode."""
    with torch.no_grad():
        image_list, _ = model.transform([i.clone().to(dtype) for i in images])
        features = list(model.backbone(image_list.tensors.to(dtype)).values())
        head = model.head(features)
    return head["cls_logits"], head["bbox_regression"]


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "fixtures" / "train_scratch")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    global DEVICE
    DEVICE = device()
    torch.manual_seed(0)
    model = build()
    images = [load_image(PHOTOS / n) for n, _, _ in IMAGES]
    targets = [
        {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(l, dtype=torch.int64)}
        for _, b, l in IMAGES
    ]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / "model.safetensors", metadata={"bn_eps": "1e-05"})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = [n for n, _ in model.named_buffers() if not n.endswith("num_batches_tracked")]

    out, losses = run(model, images, targets, torch.float32)
    out64, losses64 = run(model, images, targets, torch.float64)
    out.update({f"f64.{k}": v for k, v in out64.items()})
    save_file(out, out_dir / "expected.safetensors")
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
        # [classification, box] before each step and after the last, float32 and float64.
        "losses": losses,
        "losses_f64": losses64,
        "trainable": trainable,
        "buffers": buffers,
        "watched": WATCHED,
        "running": RUNNING,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"scratch r18: losses {losses}", flush=True)


if __name__ == "__main__":
    main()
