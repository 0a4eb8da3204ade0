#!/usr/bin/env python3
"""Times the RetinaNet network (backbone + FPN + heads, no transform or post-processing) in the
CPU runtimes a user would deploy instead of eager PyTorch: the torchvision model exported to
ONNX and run by ONNX Runtime, or by OpenVINO (f32, or bf16 through INFERENCE_PRECISION_HINT).
Prints one JSON line, as examples/bench.rs and scripts/bench_torchvision.py do; scripts/bench.sh
runs all of them side by side.

The input is the padded batch torchvision's transform makes of the image (800×1088 for a
640×480 photo at 800/1333), so the figures compare with the network part of a detect. The
line also gives the largest error of the class logits against torchvision's eager float32,
relative to their largest magnitude.

Usage: bench_runtimes.py --runtime onnxruntime|openvino [--precision f32|bf16] --weights W
    --image I [--config v1_r50_coco] [--min-size 800] [--max-size 1333] [--batch 1]
    [--runs 5] [--warmup 1] [--threads 2]
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torchvision import load_model  # noqa: E402


class Network(torch.nn.Module):
    """Backbone → FPN → heads of a torchvision RetinaNet, on a padded batch."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x):
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"]


def export(model, x, path):
    """The network as ONNX at `path` (reused when it exists: same weights and shape)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        x = x.clone()
        tmp = path.with_suffix(".tmp")
        with torch.no_grad():
            torch.onnx.export(Network(model).eval(), (x,), str(tmp), opset_version=17,
                              input_names=["images"],
                              output_names=["cls_logits", "bbox_regression"], dynamo=False)
        tmp.rename(path)
    return path


def runner(a, onnx_path):
    """A function running the network on a numpy batch, and the runtime's name."""
    if a.runtime == "onnxruntime":
        import onnxruntime as ort
        if a.precision != "f32":
            raise SystemExit("onnxruntime: f32 only here")
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return (lambda x: sess.run(None, {"images": x})), f"onnxruntime {ort.__version__}"
    import openvino as ov
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": a.threads,
                              "INFERENCE_PRECISION_HINT": a.precision,
                              "PERFORMANCE_HINT": "LATENCY",
                              "PERF_COUNT": bool(a.profile)})
    compiled = core.compile_model(str(onnx_path), "CPU")
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return [request.get_output_tensor(i).data.copy() for i in range(2)]
    run.profile = lambda: openvino_profile(compiled, request)
    return run, f"openvino {ov.__version__} {a.precision}"


def openvino_profile(compiled, request):
    """OpenVINO's per-node times of the last inference (PERF_COUNT), summed per convolution
    shape as examples/bench --profile names them (`conv KxK/S CIN->COUT on HxW`) and per node
    type for the rest, slowest first."""
    shapes = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info.keys() or info["layerType"].astype(str) != "Convolution":
            continue
        try:
            i, o = op.input(0).get_shape(), op.output(0).get_shape()
            kernel = op.input(1).get_shape()[-1] if op.get_input_size() > 1 else "?"
            shapes[op.get_friendly_name()] = (i, o, kernel)
        except Exception:  # noqa: BLE001 (dynamic shapes: keep the node's own name)
            pass
    rows = {}
    for p in request.get_profiling_info():
        ms = p.real_time.total_seconds() * 1e3
        if p.status.name != "EXECUTED" or ms == 0:
            continue
        name = f"{p.node_type} ({p.exec_type})"
        if p.node_name in shapes:
            i, o, k = shapes[p.node_name]
            stride = max(1, round(i[2] / o[2]))
            name = f"conv {k}x{k}/{stride} {i[1]}->{o[1]} on {i[2]}x{i[3]} ({p.exec_type})"
        calls, total = rows.get(name, (0, 0.0))
        rows[name] = (calls + 1, total + ms)
    out = [{"name": k, "calls": c, "ms": t} for k, (c, t) in rows.items()]
    out.sort(key=lambda r: -r["ms"])
    print("| OpenVINO node | calls | ms |\n|---|---|---|", file=sys.stderr)
    for r in out:
        print(f"| {r['name']} | {r['calls']} | {r['ms']:.1f} |", file=sys.stderr)
    print(f"| all | | {sum(r['ms'] for r in out):.1f} |", file=sys.stderr)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runtime", required=True, choices=["onnxruntime", "openvino"])
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    p.add_argument("--weights", required=True)
    p.add_argument("--config", default="v1_r50_coco")
    p.add_argument("--image", required=True)
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="detect", help="accepted for bench.sh; always the network")
    p.add_argument("--profile", action="store_true",
                   help="OpenVINO: per-node times of the last run (PERF_COUNT) in the JSON line "
                        "and as a table on standard error")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.weights, a.config, a.min_size, a.max_size)
    img = torch.from_numpy(np.array(Image.open(a.image).convert("RGB"))).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        x = model.transform([img] * a.batch)[0].tensors
        reference = Network(model)(x)[0].numpy()
    h, w = x.shape[2:]
    st = Path(a.weights).stat()
    key = f"{a.config}_{st.st_size}_{int(st.st_mtime)}_{h}x{w}_b{a.batch}"
    path = Path(__file__).resolve().parent.parent / "target" / "bench" / f"network_{key}.onnx"
    run, name = runner(a, export(model, x, path))
    xs = np.ascontiguousarray(x.numpy())
    for _ in range(a.warmup):
        out = run(xs)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        out = run(xs)
        times.append((time.perf_counter() - t0) * 1e3)
    err = float(np.abs(out[0] - reference).max() / np.abs(reference).max())
    profile = run.profile() if a.profile and hasattr(run, "profile") else None
    print(json.dumps({"profile": profile, "impl": name, "mode": "network", "batch": a.batch, "min_size": a.min_size,
                      "input": [int(h), int(w)], "ms_median": statistics.median(times), "ms_all": times,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "cls_logits_max_rel_err": err}))


if __name__ == "__main__":
    main()
