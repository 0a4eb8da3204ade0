"""What the reference scripts share: where the photos are, which device torchvision runs on, and
safetensors I/O that works without the `safetensors` package (a GPU machine may have torch and
torchvision only).

Environment:
- RETINANET_PHOTOS: the photos folder (default ../shared/data/photos beside the repository).
- RETINANET_FIXTURE_DEVICE: `cpu` (default) or `cuda`: the device torchvision computes the
  references on. On CUDA, TF32 is off (true float32 products, as ours) and deterministic
  algorithms are requested where PyTorch has them (warnings elsewhere).
"""
import json
import os
import struct
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(os.environ.get("RETINANET_PHOTOS", ROOT.parent / "shared" / "data" / "photos"))


def device():
    """The device of the reference computations (see the module's docstring)."""
    name = os.environ.get("RETINANET_FIXTURE_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    return dev


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_file(tensors, path, metadata=None):
    """safetensors.torch.save_file, or the same format written here."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        from safetensors.torch import save_file as st_save
    except ImportError:
        st_save = None
    if st_save is not None:
        return st_save(tensors, str(path), metadata=metadata)
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load_file(path):
    """safetensors.torch.load_file, or the same format read here."""
    try:
        from safetensors.torch import load_file as st_load
    except ImportError:
        st_load = None
    if st_load is not None:
        return st_load(str(path))
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    by_name = {v: k for k, v in _DTYPES.items()}
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        buf = bytearray(raw[8 + n + start:8 + n + end])
        out[name] = torch.frombuffer(buf, dtype=by_name[info["dtype"]]).reshape(info["shape"]).clone() \
            if buf else torch.empty(info["shape"], dtype=by_name[info["dtype"]])
    return out
