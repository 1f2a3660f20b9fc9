"""safetensors read and written tensor by tensor with plain file I/O.

``safetensors.torch.save`` serialises the whole dict in memory and ``load_file`` memory-maps the file; for gradient
sums of a large model (``slug grads``: two float32 copies of the candidate tensors) both cost a second full copy.
These two functions keep only one tensor resident. The layout is safetensors' own (8-byte little-endian header
length, JSON header with ``dtype``/``shape``/``data_offsets`` and ``__metadata__``, then the raw bytes), so any
safetensors reader opens what :func:`write_safetensors` writes. Nothing here unpickles.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .files import atomic_writer

__all__ = ["read_header", "read_metadata", "read_tensors", "write_safetensors"]

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor (no in-memory serialised copy of the whole dict, unlike
    ``safetensors.torch.save``), atomically (temp file in the same directory + fsync + ``os.replace``).
    Keys are written sorted; ``metadata`` values must be strings (safetensors' rule)."""
    items = sorted(tensors.items())
    header: dict = {"__metadata__": metadata}
    off = 0
    for k, t in items:
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with atomic_writer(path) as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in items:
            t = t.detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # zero-copy view of a CPU tensor


def read_header(path: str | Path) -> tuple[dict, int]:
    """``(header, data_offset)`` of a safetensors file: the parsed JSON header and where the tensor bytes start.
    Raises ``ValueError`` naming the file when it is too short or its header is not JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from e
    return header, 8 + n


def read_metadata(path: str | Path, key: str = "slugkit") -> dict:
    """The JSON document slugkit stores under ``__metadata__[key]`` ({} when absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(key, "{}"))


def read_tensors(path: str | Path, keys: list[str], device="cpu"):
    """Yield ``(key, tensor)`` from a safetensors file with plain reads, one tensor at a time (no memory map: only
    the tensor being read is resident)."""
    inv = {v: k for k, v in _DTYPES.items()}
    header, base = read_header(path)
    with open(path, "rb") as f:
        for k in keys:
            info = header[k]
            t = torch.empty(info["shape"], dtype=inv[info["dtype"]])
            begin, end = info["data_offsets"]
            if end > begin:
                f.seek(base + begin)
                buf = t.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(buf) != end - begin:
                    raise ValueError(f"{path}: tensor {k} is truncated")
            yield k, t.to(device)
