#!/usr/bin/env python3
"""How many of torchvision's float32 detections a deployed runtime finds again on the parity
fixtures: the fixture's network (backbone + FPN + heads) exported to ONNX and run by OpenVINO
(f32 or bf16 through INFERENCE_PRECISION_HINT) or ONNX Runtime, its outputs through
torchvision's own post-processing, matched against the fixture's detections (same label, IoU
and |Δscore| bounds as tests/parity.rs's bf16 report). It puts our `--precision bf16` figure
(`bf16_products_accuracy_cost`) beside OpenVINO's.

Usage: openvino_agreement.py [--precision bf16] [--runtime openvino] [--iou 0.98]
    [--score 0.02] [--fixtures target/fixtures/parity] [CONFIG...]   (default v1_r50_coco v2_r50_coco)
Prints one line per image and a JSON summary line.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import Network, export  # noqa: E402
from bench_torchvision import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def session(runtime, precision, onnx_path, threads):
    """A function running the exported network on a numpy batch."""
    if runtime == "onnxruntime":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"images": x})
    import openvino as ov
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads,
                              "INFERENCE_PRECISION_HINT": precision})
    request = core.compile_model(str(onnx_path), "CPU").create_infer_request()

    def run(x):
        request.infer({0: x})
        return [request.get_output_tensor(i).data.copy() for i in range(2)]
    return run


def detections(model, images, cls_logits, bbox_regression):
    """torchvision's RetinaNet post-processing of head outputs computed elsewhere."""
    original = [tuple(im.shape[-2:]) for im in images]
    batch, _ = model.transform(images)
    with torch.no_grad():
        features = list(model.backbone(batch.tensors).values())
    anchors = model.anchor_generator(batch, features)
    hw = [f.size(2) * f.size(3) for f in features]
    a = cls_logits.size(1) // sum(hw)
    per_level = [x * a for x in hw]
    head = {"cls_logits": list(cls_logits.split(per_level, dim=1)),
            "bbox_regression": list(bbox_regression.split(per_level, dim=1))}
    split_anchors = [list(x.split(per_level)) for x in anchors]
    dets = model.postprocess_detections(head, split_anchors, batch.image_sizes)
    return model.transform.postprocess(dets, batch.image_sizes, original)


def matched(theirs, ours, iou_min, score_tol):
    """Greedy one-to-one matches of torchvision's detections among `ours`, as tests/parity.rs."""
    if len(theirs["boxes"]) == 0:
        return 0
    iou = box_iou(theirs["boxes"], ours["boxes"]) if len(ours["boxes"]) else None
    used = set()
    n = 0
    for t in range(len(theirs["boxes"])):
        for j in range(len(ours["boxes"])):
            if (j not in used and int(ours["labels"][j]) == int(theirs["labels"][t])
                    and abs(float(ours["scores"][j] - theirs["scores"][t])) <= score_tol
                    and float(iou[t, j]) >= iou_min):
                used.add(j)
                n += 1
                break
    return n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("configs", nargs="*", default=["v1_r50_coco", "v2_r50_coco"])
    p.add_argument("--runtime", default="openvino", choices=["openvino", "onnxruntime"])
    p.add_argument("--precision", default="bf16", choices=["f32", "bf16"])
    p.add_argument("--iou", type=float, default=0.98)
    p.add_argument("--score", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fixtures", default=str(ROOT / "target" / "fixtures" / "parity"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    total_found = total = 0
    for name in a.configs:
        d = Path(a.fixtures) / name
        meta = json.loads((d / "meta.json").read_text())
        expected = load_file(str(d / "expected.safetensors"))
        model = load_model(str(d / "model.safetensors"), name, meta["min_size"], meta["max_size"])
        images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float()
                  / 255.0 for p in meta["images"]]
        x = model.transform(images)[0].tensors
        onnx = ROOT / "target" / "bench" / f"agreement_{name}_{tuple(x.shape)}.onnx".replace(" ", "")
        run = session(a.runtime, a.precision, export(model, x, onnx), a.threads)
        cls, reg = (torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in run(x.numpy()))
        with torch.no_grad():
            ref_cls = Network(model)(x)[0]
        err = float((cls - ref_cls).abs().max() / ref_cls.abs().max())
        ours = detections(model, images, cls, reg)
        for i, det in enumerate(ours):
            theirs = {k: expected[f"det{i}_{k}"] for k in ("boxes", "scores", "labels")}
            found = matched(theirs, det, a.iou, a.score)
            total_found += found
            total += len(theirs["boxes"])
            print(f"{name} image {i}: {found}/{len(theirs['boxes'])} torchvision detections found "
                  f"again (IoU >= {a.iou}, |dscore| <= {a.score}); cls_logits rel err {err:.2e}",
                  file=sys.stderr)
    print(json.dumps({"runtime": a.runtime, "precision": a.precision, "iou": a.iou,
                      "score_tol": a.score, "found": total_found, "of": total,
                      "share": total_found / max(total, 1)}))


if __name__ == "__main__":
    main()
