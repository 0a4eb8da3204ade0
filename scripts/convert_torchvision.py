#!/usr/bin/env python3
"""Converts a torchvision RetinaNet or ResNet checkpoint (.pth) to .safetensors.

    python scripts/convert_torchvision.py retinanet_resnet50_fpn_coco-eeacb38b.pth \
        retinanet_resnet50_fpn_coco.safetensors [--f16] [--classes coco|FILE] [--bn-eps EPS]

Tensor names are kept as they are (the Rust loader accepts torchvision's current and pre-0.13
layouts); `num_batches_tracked` buffers are dropped. The safetensors `__metadata__` records
what the Rust side needs and cannot see in the tensors:

- `architecture`: e.g. `retinanet_resnet50_fpn`, `retinanet_resnet50_fpn_v2`, `resnet50`
- `bn_eps`: the frozen batch-norm eps (torchvision loads its COCO v1 weights with 0.0; v2 and
  ResNets use 1e-5)
- `class_names`: a JSON array, one name per label (COCO's 91-index names by default for
  91-class detectors)
- `source` (file name), `source_sha256` and `dtype`

`--f16` stores floating-point tensors in half precision (half the size); the Rust loader
converts them back to f32. The output is written to a temporary file and renamed into place.
"""

import argparse
import hashlib
import json
import os
import stat
import sys
import tempfile

import torch
from safetensors.torch import save_file

# torchvision's COCO category names in its 91-index order (src/classes.rs holds the same).
COCO_91 = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
assert len(COCO_91) == 91

DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
          (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}


def fail(msg):
    sys.exit(f"error: {msg}")


def load_state_dict(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file
        fail(f"{path}: cannot read as a PyTorch checkpoint: {e}")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        fail(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resnet_depth(sd, prefix, path):
    counts = []
    for layer in range(1, 5):
        n = 0
        while f"{prefix}layer{layer}.{n}.conv1.weight" in sd:
            n += 1
        counts.append(n)
    bottleneck = f"{prefix}layer1.0.conv3.weight" in sd
    depth = DEPTHS.get((*counts, bottleneck))
    if depth is None:
        fail(f"{path}: not a torchvision ResNet (blocks per stage {counts})")
    return depth


def describe(sd, path):
    """(architecture, default bn eps, number of classes or None)."""
    if "backbone.body.conv1.weight" in sd:
        depth = resnet_depth(sd, "backbone.body.", path)
        v2 = any(k.startswith("head.classification_head.conv.0.1.") for k in sd)
        cls = sd.get("head.classification_head.cls_logits.weight")
        reg = sd.get("head.regression_head.bbox_reg.weight")
        if cls is None or reg is None:
            fail(f"{path}: a RetinaNet needs head.*.cls_logits and bbox_reg weights")
        num_classes = cls.shape[0] // (reg.shape[0] // 4)
        arch = f"retinanet_resnet{depth}_fpn" + ("_v2" if v2 else "")
        return arch, (1e-5 if v2 else 0.0), num_classes
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return f"resnet{resnet_depth(sd, '', path)}", 1e-5, None
    fail(f"{path}: neither a torchvision RetinaNet nor a ResNet state dict")


def class_names(spec, num_classes):
    if spec is None:
        return COCO_91 if num_classes == 91 else None
    if spec == "coco":
        names = COCO_91
    else:
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        names = json.loads(text) if text.lstrip().startswith("[") else text.splitlines()
    if num_classes is not None and len(names) != num_classes:
        fail(f"--classes {spec}: {len(names)} names for a model with {num_classes} classes")
    return names


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="torchvision .pth state dict")
    p.add_argument("output", help=".safetensors file to write")
    p.add_argument("--f16", action="store_true", help="store floating-point tensors as f16")
    p.add_argument("--classes", help="'coco' or a file: a JSON array or one name per line")
    p.add_argument("--bn-eps", type=float, help="frozen batch-norm eps to record "
                   "(default: 0.0 for v1 RetinaNets, 1e-5 otherwise)")
    args = p.parse_args()

    sd = load_state_dict(args.input)
    arch, eps, num_classes = describe(sd, args.input)
    names = class_names(args.classes, num_classes)
    dtype = torch.float16 if args.f16 else None
    tensors = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    metadata = {
        "format": "pt",
        "architecture": arch,
        "bn_eps": repr(args.bn_eps if args.bn_eps is not None else eps),
        "source": os.path.basename(args.input),
        "source_sha256": sha256(args.input),
        "dtype": "float16" if args.f16 else "as stored",
    }
    if names is not None:
        metadata["class_names"] = json.dumps(names)

    write_output(args.output, tensors, metadata)
    size = os.path.getsize(args.output) / 1e6
    print(f"{args.output}: {arch}, {len(tensors)} tensors, {size:.1f} MB, bn_eps "
          f"{metadata['bn_eps']}, {len(names) if names else 'no'} class names", file=sys.stderr)


def sorted_header(data):
    """The safetensors bytes with the JSON header's keys sorted (save_file writes the
    metadata in hash order): the same input always gives the same file."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"))
    header = header.encode() + b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def write_output(output, tensors, metadata):
    """As the crate writes files (src/io/atomic.rs): through a symlink to its target, a
    regular file replaced by a synced temporary in one rename, a device or FIFO written in
    place, a folder refused."""
    target = os.path.realpath(output)
    if os.path.exists(target) and not os.path.isfile(target):
        mode = os.stat(target).st_mode
        if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
            sys.exit(f"error: {output}: not a regular file; refusing to replace it")
    out_dir = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".convert-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            data = sorted_header(f.read())
        if os.path.exists(target) and not os.path.isfile(target):
            with open(target, "wb") as f:
                f.write(data)
            return
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if __name__ == "__main__":
    main()
