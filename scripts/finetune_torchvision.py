"""The `finetune` example's recipe in torchvision, for comparing accuracy and speed.

Same architecture (v1 RetinaNet on ResNet-18/34/50 with frozen batch norm, 3 trainable
backbone stages), the same tiles of the same VOC data (tile_starts and crop_boxes as in
src/data/augment.rs), the same input size, batch, horizontal flips, SGD (momentum 0.9, weight
decay 1e-4) and learning-rate schedule (LrSchedule::scaled: linear warm-up from a third,
×0.1 at 2/3 and 8/9 of the run). Shuffling and flips draw from torch's generator, not ours.

No pretrained weights are needed: `--save-init` writes a starting point that both runs load
(`--init` here, `--weights` for `finetune`): a ResNet from a RetinaNet checkpoint (the parity
fixture's random, batch-norm-calibrated backbone) with torchvision's fresh FPN and head.

    python scripts/finetune_torchvision.py --save-init init.safetensors \
        --backbone-from target/fixtures/parity/v1_r18_k7/model.safetensors
    python scripts/finetune_torchvision.py --init init.safetensors --train TRAIN --val VAL \
        --tile 400 --overlap 64 --min-size 400 --max-size 400 --steps 300 --json out.json

With `--from-scratch`, as torchvision without weights (and `finetune --from-scratch`): nn.BatchNorm2d
in training mode and all 5 backbone stages train; `--save-init --from-scratch` (no
`--backbone-from`) writes torchvision's own random initialisation, running statistics included,
which `finetune --weights init.safetensors --batch-norm train --trainable-layers 5` loads.

`--replay RUN/metrics.jsonl` takes each step's tiles and flips from a `finetune` run (its step
records name them) instead of torch's generator, so that both runs see the same batches.

Prints AP and AP50 on the validation set (pycocotools) and the mean seconds per step.
"""

import argparse
import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file, save_file
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet, _default_anchorgen
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
import torchvision.transforms.functional as TF

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "JPG", "PNG"]
PAPER_BATCH, PAPER_STEPS, PAPER_WARMUP = 16, 90_000, 500
PAPER_MILESTONES = [60_000, 80_000]


def build(depth, num_classes, min_size, max_size, trainable_layers, scratch=False):
    """torchvision's retinanet_resnet50_fpn (v1) layout on a ResNet of `depth`; from scratch
    (as retinanet_resnet50_fpn without weights) with nn.BatchNorm2d instead of frozen BN."""
    norm = torch.nn.BatchNorm2d if scratch else misc_nn_ops.FrozenBatchNorm2d
    body = getattr(resnet, f"resnet{depth}")(norm_layer=norm)
    backbone = _resnet_fpn_extractor(
        body, trainable_layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return RetinaNet(
        backbone, num_classes, min_size=min_size, max_size=max_size,
        anchor_generator=_default_anchorgen(),
    )


def save_init(args):
    torch.manual_seed(args.seed)
    model = build(args.depth, args.num_classes, args.min_size, args.max_size,
                  args.trainable_layers, args.from_scratch)
    state = model.state_dict()
    if args.backbone_from:
        source = load_file(args.backbone_from)
        for name in state:
            if name.startswith("backbone.body."):
                state[name] = source[name].to(state[name].dtype)
    elif not args.from_scratch:
        raise SystemExit("--save-init needs --backbone-from, or --from-scratch")
    save_file({k: v.contiguous() for k, v in state.items()}, args.save_init,
              metadata={"bn_eps": "1e-05", "class_names": json.dumps(["Tree"])})
    print(f"wrote {args.save_init}")


def find_image(folder, xml_root):
    name = xml_root.findtext("filename")
    path = folder / name
    if path.exists():
        return path
    for ext in IMAGE_EXTENSIONS:  # the data module's fallback: same stem, known extension
        candidate = folder / f"{Path(name).stem}.{ext}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(path)


def load_voc(folder, classes):
    """[(image path, (w, h), boxes float32 (N, 4), labels int64 (N,))], boxes clipped."""
    folder = Path(folder)
    samples = []
    for xml in sorted(folder.glob("*.xml")):
        root = ET.parse(xml).getroot()
        path = find_image(folder, root)
        w, h = Image.open(path).size
        boxes, labels = [], []
        for obj in root.iter("object"):
            bb = obj.find("bndbox")
            b = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            b = [min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)]
            if b[2] > b[0] and b[3] > b[1]:
                boxes.append(b)
                labels.append(classes.index(obj.findtext("name")))
        samples.append((path, (w, h), np.array(boxes, np.float32).reshape(-1, 4),
                        np.array(labels, np.int64)))
    return samples


def tile_starts(length, size, overlap):
    """As `retinanet::tiling::tile_windows`: a step of size - overlap, the last tile moved back
    to the far edge."""
    if length <= size:
        return [0]
    stride, last = size - overlap, length - size
    return list(range(0, last, stride)) + [last]


def crop_boxes(boxes, labels, x, y, w, h, min_visibility=0.5):
    c = np.stack([np.maximum(boxes[:, 0], x), np.maximum(boxes[:, 1], y),
                  np.minimum(boxes[:, 2], x + w), np.minimum(boxes[:, 3], y + h)], 1)
    nonempty = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = nonempty & (inside >= (min_visibility - 1e-6) * area)
    return c[keep] - np.array([x, y, x, y], np.float32), labels[keep]


def tiles(samples, size, overlap):
    """Tiles as (image tensor, boxes, labels), images decoded once; tiles without boxes stay
    (background-only samples), as `Dataset::tile` keeps them by default."""
    out = []
    for path, (w, h), boxes, labels in samples:
        image = TF.to_tensor(Image.open(path).convert("RGB"))
        for y in tile_starts(h, size, overlap):
            for x in tile_starts(w, size, overlap):
                tw, th = min(size, w), min(size, h)
                b, l = crop_boxes(boxes, labels, x, y, tw, th)
                out.append((image[:, y:y + th, x:x + tw], b, l))
    return out


def lr_at(step, total, batch, base_lr):
    """LrSchedule::scaled(total * batch, batch, 1.0), base rate replaced by `base_lr`."""
    warmup = min(-(-(PAPER_WARMUP * PAPER_BATCH) // batch), total // 5)
    milestones = [math.floor(total * m / PAPER_STEPS + 0.5) for m in PAPER_MILESTONES]
    warm = 1.0
    if step < warmup:
        t = step / warmup
        warm = (1.0 / 3.0) * (1.0 - t) + t
    return base_lr * warm * 0.1 ** sum(step >= m for m in milestones)


def batches(n, batch, gen, hflip):
    """(sample ids, flips) of each step, drawn from torch's generator."""
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch):
            ids = order[i:i + batch]
            yield ids, [torch.rand(1, generator=gen).item() < hflip for _ in ids]


def replayed(metrics, steps, n):
    """(sample ids, flips) of each step of a `finetune` run, from its metrics.jsonl."""
    records = {}
    for line in Path(metrics).read_text().splitlines():
        r = json.loads(line)
        if "samples" in r:
            records[r["step"]] = (r["samples"], r["flipped"])
    missing = [s for s in range(1, steps + 1) if s not in records]
    if missing:
        raise SystemExit(f"{metrics}: no samples recorded for {len(missing)} steps "
                         f"(first {missing[0]}); run finetune with --log-every 1")
    if max(max(ids) for ids, _ in records.values()) >= n:
        raise SystemExit(f"{metrics}: sample ids beyond this run's {n} tiles")
    return (records[s] for s in range(1, steps + 1))


def train(model, data, args):
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = args.lr if args.lr is not None else 0.01 * args.batch_size / PAPER_BATCH
    opt = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    if args.replay:
        stream = replayed(args.replay, args.steps, len(data))
    else:
        stream = batches(len(data), args.batch_size, gen, args.hflip)
    model.train()
    times, log = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        images, targets = [], []
        ids, flips = next(stream)
        for i, flip in zip(ids, flips):
            image, b, l = data[i]
            b = torch.from_numpy(b.copy())
            if flip:
                image = image.flip(-1)
                w = image.shape[-1]
                b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1) if len(b) else b
            images.append(image)
            targets.append({"boxes": b.reshape(-1, 4), "labels": torch.from_numpy(l)})
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.batch_size, base_lr)
        losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss at step {step}: {losses}")
        opt.zero_grad()
        loss.backward()
        if args.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)
        opt.step()
        times.append(time.perf_counter() - t0)
        log.append({"step": step + 1, "classification": losses["classification"].item(),
                    "box_regression": losses["bbox_regression"].item()})
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} cls {log[-1]['classification']:.4f} "
                  f"box {log[-1]['box_regression']:.4f} {times[-1]:.2f} s", flush=True)
    return times, log


@torch.no_grad()
def evaluate(model, samples):
    """COCO AP and AP50 with pycocotools; ids as `finetune` uses them (annotations from 1)."""
    model.eval()
    images, annotations, dets = [], [], []
    for i, (path, (w, h), boxes, labels) in enumerate(samples):
        images.append({"id": i, "width": w, "height": h})
        for b, l in zip(boxes.tolist(), labels.tolist()):
            bw, bh = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": l,
                                "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": 0})
        out = model([TF.to_tensor(Image.open(path).convert("RGB"))])[0]
        for b, s, l in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            dets.append({"image_id": i, "category_id": l,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": 0, "name": "Tree"}]}
    gt.createIndex()
    if not dets:
        return 0.0, 0.0
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-init")
    p.add_argument("--backbone-from")
    p.add_argument("--init")
    p.add_argument("--train")
    p.add_argument("--val")
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--num-classes", type=int, default=1)
    p.add_argument("--tile", type=int, default=400)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--min-size", type=int, default=400)
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float)
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--clip-grad-norm", type=float)
    p.add_argument("--trainable-layers", type=int, help="default 3; 5 with --from-scratch")
    p.add_argument("--from-scratch", action="store_true",
                   help="nn.BatchNorm2d in training mode (as torchvision without weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--replay", help="a finetune run's metrics.jsonl: train on its batches and flips")
    p.add_argument("--json")
    args = p.parse_args()
    if args.trainable_layers is None:
        args.trainable_layers = 5 if args.from_scratch else 3
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.save_init:
        return save_init(args)

    torch.manual_seed(args.seed)
    model = build(args.depth, args.num_classes, args.min_size, args.max_size,
                  args.trainable_layers, args.from_scratch)
    model.load_state_dict(load_file(args.init))
    classes = ["Tree"]
    data = tiles(load_voc(args.train, classes), args.tile, args.overlap)
    print(f"{len(data)} tiles, {sum(len(b) for _, b, _ in data)} boxes")
    times, log = train(model, data, args)
    ap, ap50 = evaluate(model, load_voc(args.val, classes))
    warm = times[5:] if len(times) > 10 else times
    result = {"AP": ap, "AP50": ap50, "steps": args.steps, "s_per_step": float(np.mean(warm)),
              "threads": args.threads, "losses": log}
    print(f"AP {ap:.4f} AP50 {ap50:.4f}, {result['s_per_step']:.3f} s/step over {args.steps} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
