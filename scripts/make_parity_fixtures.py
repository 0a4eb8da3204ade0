#!/usr/bin/env python3
"""Writes torchvision reference outputs that the Rust parity tests compare against.

For each configuration it builds a torchvision RetinaNet with random but realistic weights:
batch-norm statistics calibrated on real photos, He-initialised head convs, class biases set
so that a spread of (anchor, class) pairs pass the 0.05 score threshold (the top-1000 cap and
NMS both have real work), and box deltas of a realistic spread. It saves the weights as
safetensors and as .pth and records, on real photos of odd sizes (PNG, so decoding is exact on
both sides), the padded input batch, C3-C5, P3-P7, the head outputs, the anchors and the final
detections.

Usage: make_parity_fixtures.py [OUT_DIR]   (default: target/fixtures/parity)
"""
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from fixture_common import PHOTOS, device, save_file

ROOT = Path(__file__).resolve().parent.parent

# name, resnet depth, version, classes, bn eps, (min, max) size, images, extra safetensors metadata
CONFIGS = [
    dict(name="v1_r50_coco", depth=50, version=1, classes=91, eps=0.0, size=(800, 1333),
         images=["chelsea.png", "coffee.png"], pth_old_layout=True, metadata={}),
    dict(name="v2_r50_coco", depth=50, version=2, classes=91, eps=1e-5, size=(512, 853),
         images=["dog_crop.png", "chelsea.png"], pth_old_layout=False, metadata={}),
    dict(name="v1_r18_k7", depth=18, version=1, classes=7, eps=1e-5, size=(600, 1000),
         images=["dog_crop.png"], pth_old_layout=True, metadata={"bn_eps": "1e-05"}),
    dict(name="v2_r34_k3", depth=34, version=2, classes=3, eps=1e-5, size=(480, 800),
         images=["coffee.png", "astronaut.png"], pth_old_layout=False, metadata={}),
]
CALIBRATION = ["grace_hopper.jpg", "rocket.jpg", "darknet_person.jpg"]
RESNETS = {18: resnet18, 34: resnet34, 50: resnet50}


def load_image(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def build(cfg, norm_layer):
    """The torchvision model of a configuration, with the given backbone norm layer."""
    backbone = RESNETS[cfg["depth"]](weights=None, norm_layer=norm_layer)
    c5 = 2048 if cfg["depth"] >= 50 else 512
    extra = LastLevelP6P7(256, 256) if cfg["version"] == 1 else LastLevelP6P7(c5, 256)
    backbone = _resnet_fpn_extractor(backbone, 5, returned_layers=[2, 3, 4], extra_blocks=extra)
    head_norm = None if cfg["version"] == 1 else partial(nn.GroupNorm, 32)
    head = RetinaNetHead(256, 9, cfg["classes"], norm_layer=head_norm)
    min_size, max_size = cfg["size"]
    return RetinaNet(backbone, cfg["classes"], min_size=min_size, max_size=max_size, head=head)


@torch.no_grad()
def randomise(model, cfg, calib, images, gen):
    """Realistic random weights: batch norm calibrated on `calib`, He-initialised head, and
    class biases spread so that every image of `images` has candidates in every class."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        if isinstance(m, nn.GroupNorm):
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    for head in (model.head.classification_head, model.head.regression_head):
        for m in head.conv.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / (9 * m.in_channels)), generator=gen)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)

    # Batch-norm statistics from real photos (train mode, backbone body only).
    model.eval()
    model.backbone.body.train()
    batch = model.transform(calib)[0].tensors
    for i in range(batch.shape[0]):
        model.backbone.body(batch[i : i + 1])
    model.eval()

    features = list(model.backbone(model.transform(images)[0].tensors).values())
    cls = model.head.classification_head
    reg = model.head.regression_head
    trunk_cls = [cls.conv(f) for f in features]
    trunk_reg = [reg.conv(f) for f in features]

    # Box deltas with a spread of about 0.2.
    nn.init.normal_(reg.bbox_reg.weight, std=1.0, generator=gen)
    reg.bbox_reg.bias.zero_()
    raw = torch.cat([reg.bbox_reg(t).flatten() for t in trunk_reg])
    reg.bbox_reg.weight.mul_(0.2 / raw.std())
    reg.bbox_reg.bias.copy_(torch.randn(reg.bbox_reg.bias.shape, generator=gen) * 0.05)

    # Class logits with unit spread, then per-class biases such that a log-uniform fraction
    # (1e-5 .. 3e-3; more for few classes) of each image's anchors at least passes the 0.05 threshold.
    k = cfg["classes"]
    nn.init.normal_(cls.cls_logits.weight, std=1.0, generator=gen)
    cls.cls_logits.bias.zero_()
    logits = [cls.cls_logits(t) for t in trunk_cls]
    scale = torch.cat([l.flatten() for l in logits]).std()
    cls.cls_logits.weight.div_(scale)
    # (classes, images, anchors)
    per_class = torch.cat([(l / scale).reshape(l.shape[0], 9, k, -1).permute(2, 0, 1, 3).flatten(2)
                           for l in logits], dim=2)
    lo, hi = (1e-5, 3e-3) if k > 10 else (1e-3, 3e-2)  # fewer classes: more per class
    fractions = torch.exp(torch.empty(k).uniform_(math.log(lo), math.log(hi), generator=gen))
    thresh = math.log(0.05 / 0.95)
    bias = torch.empty(9, k)
    for c in range(k):
        q = min(float(torch.quantile(x, 1.0 - float(fractions[c]))) for x in per_class[c])
        bias[:, c] = thresh - q
    cls.cls_logits.bias.copy_(bias.flatten())


def old_layout(state):
    """torchvision < 0.13 key names: FPN blocks without `.0`, head convs as conv.{0,2,4,6}."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[:2] == ["backbone", "fpn"] and parts[2] in ("inner_blocks", "layer_blocks"):
            key = ".".join(parts[:4] + parts[5:])
        elif parts[0] == "head" and parts[2] == "conv":
            key = ".".join(parts[:3] + [str(2 * int(parts[3]))] + parts[5:])
        out[key] = value
    return out


def to_frozen(model, cfg):
    """A copy of a v1 model with FrozenBatchNorm2d and the configuration's eps."""
    frozen = build(cfg, FrozenBatchNorm2d)
    missing, unexpected = frozen.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(u.endswith("num_batches_tracked") for u in unexpected), (missing, unexpected)
    overwrite_eps(frozen, cfg["eps"])
    return frozen.eval()


@torch.no_grad()
def record(model, images):
    image_list, _ = model.transform(images)
    body = model.backbone.body(image_list.tensors)
    fpn = model.backbone.fpn(body)
    features = list(fpn.values())
    head = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    out = {"input": image_list.tensors}
    for name, t in zip(["c3", "c4", "c5"], body.values()):
        out[name] = t
    for name, t in zip(["p3", "p4", "p5", "p6", "p7"], features):
        out[name] = t
    out["cls_logits"] = head["cls_logits"]
    out["bbox_regression"] = head["bbox_regression"]
    out["anchors"] = anchors[0]
    detections = model(images)
    for i, d in enumerate(detections):
        out[f"det{i}_boxes"] = d["boxes"]
        out[f"det{i}_scores"] = d["scores"]
        out[f"det{i}_labels"] = d["labels"].to(torch.int64)
    return out, image_list.image_sizes, detections


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target" / "fixtures" / "parity")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Two threads or more: PyTorch's NCHW bilinear kernel (one thread takes another path).
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    dev = device()

    # An odd-sized PNG crop of a JPEG, decoded here once so both sides read the same pixels.
    dog = Image.open(PHOTOS / "darknet_dog.jpg").convert("RGB").crop((31, 57, 31 + 517, 57 + 333))
    dog.save(out_dir / "dog_crop.png")
    image_path = lambda n: out_dir / n if n == "dog_crop.png" else PHOTOS / n
    calib = [load_image(PHOTOS / n) for n in CALIBRATION]

    index = []
    for seed, cfg in enumerate(CONFIGS):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(1000 + seed)
        model = build(cfg, nn.BatchNorm2d)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = cfg["eps"] if cfg["version"] == 2 else 1e-5
        images = [load_image(image_path(n)) for n in cfg["images"]]
        randomise(model, cfg, calib, images, gen)
        model = to_frozen(model, cfg) if cfg["version"] == 1 else model.eval()

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg["version"] == 1:
            st_state = state  # FrozenBatchNorm2d has no num_batches_tracked
            pth_state = dict(state)
            for k in list(state):
                if k.endswith("running_var"):
                    pth_state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
        else:
            st_state = state  # nn.BatchNorm2d: with num_batches_tracked
            pth_state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        if cfg["pth_old_layout"]:
            pth_state = old_layout(pth_state)
        d = out_dir / cfg["name"]
        d.mkdir(exist_ok=True)
        save_file(st_state, d / "model.safetensors", metadata=cfg["metadata"] or None)
        torch.save(pth_state, d / "model.pth")

        # The weights come from the CPU (the same on every machine); the references from `dev`.
        tensors, image_sizes, detections = record(model.to(dev), [i.to(dev) for i in images])
        save_file(tensors, d / "expected.safetensors")
        counts = [int(x["boxes"].shape[0]) for x in detections]
        assert all(c >= 100 for c in counts), f"{cfg['name']}: too few detections {counts}"
        meta = {
            "name": cfg["name"],
            "depth": cfg["depth"],
            "version": cfg["version"],
            "num_classes": cfg["classes"],
            "bn_eps": cfg["eps"],
            "min_size": cfg["size"][0],
            "max_size": cfg["size"][1],
            "images": [str(image_path(n)) for n in cfg["images"]],
            "image_sizes": [list(s) for s in image_sizes],
            "original_sizes": [[int(i.shape[1]), int(i.shape[2])] for i in images],
            "detections_per_image": counts,
            "pth_old_layout": cfg["pth_old_layout"],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "device": str(dev),
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
        index.append(cfg["name"])
        print(f"{cfg['name']}: input {tuple(tensors['input'].shape)}, detections {counts}", flush=True)
    (out_dir / "index.json").write_text(json.dumps(index))


if __name__ == "__main__":
    main()
