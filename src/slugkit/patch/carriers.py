"""Checkpoint carriers: a patch applied to a ``.safetensors`` state dict rather than a live model.

A checkpoint is recognised by parsing its header (:func:`slugkit.common.weights.check_weights_file`), never by its
name or first byte: a valid safetensors file whose header length makes its first byte 0x80 loads, a pickle
(``torch.save``, raw pickle) is refused with the lines that convert a trusted one, and a Git LFS pointer is named as
one (run ``git lfs pull``). Nothing is ever unpickled.

Writing back keeps the user's file as it was: :func:`save_state_dict_file` with ``template=`` (the checkpoint the
state came from) reuses the template's header verbatim — its ``__metadata__`` (``modelspec.*`` keys and the like),
key order and padding — and writes each tensor at its old offset, so applying then reverting a patch gives the
original file back byte for byte. A fresh file has its metadata keys sorted: safetensors keeps ``__metadata__`` in a
hash map whose order changes from call to call, and slugkit's outputs are deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from ..common.files import atomic_write_bytes, atomic_writer
from ..common.weights import WeightsFileError, check_weights_file
from .format import PatchError, PatchFormatError

_ST_DTYPES = {getattr(torch, t): n for t, n in (
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"), ("uint16", "U16"),
    ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"))
    if hasattr(torch, t)}


def _checked_header(path: Path) -> dict:
    """The safetensors header of ``path``; :class:`PatchFormatError` (same message) for a pickle, an LFS pointer, an
    empty, truncated or foreign file, ``FileNotFoundError`` when it is missing."""
    try:
        return check_weights_file(path, "checkpoint")
    except WeightsFileError as e:
        raise PatchFormatError(str(e)) from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` checkpoint into a CPU state dict (judged by its content, whatever its name).

    Raises ``FileNotFoundError`` when ``path`` does not exist and :class:`PatchFormatError` naming the file when it
    is a pickle (never opened as one; the message shows how to convert a trusted one), a Git LFS pointer ("run
    ``git lfs pull``"), empty, truncated, or not safetensors."""
    path = Path(path)
    _checked_header(path)
    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except Exception as e:
        raise PatchFormatError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from e


def _prepared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors by sorted name; tensors sharing storage (tied weights, views) are cloned."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise PatchError(f"state dict entry {name!r} is not a tensor ({type(t).__name__})")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return tensors


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the ``__metadata__`` entries in sorted order (the rest of the header as written)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header = {"__metadata__": dict(sorted(header.get("__metadata__", {}).items())),
              **{k: v for k, v in header.items() if k != "__metadata__"}}
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data[8 + n:]


def _template_layout(template: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[int, list] | None:
    """``(data_start, [(name, begin, end)] by offset)`` when ``template`` holds exactly ``tensors``' names, dtypes
    and shapes in non-overlapping ranges, else None."""
    header = _checked_header(template)
    entries = sorted(((k, *v["data_offsets"]) for k, v in header.items() if k != "__metadata__"),
                     key=lambda e: e[1])
    if {e[0] for e in entries} != set(tensors):
        return None
    end = 0
    for name, b, e in entries:
        t = tensors[name]
        info = header[name]
        if _ST_DTYPES.get(t.dtype) != info["dtype"] or list(t.shape) != list(info["shape"]) or b < end:
            return None
        end = e
    with open(template, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n, entries


def _copy_range(src, dst, start: int, length: int) -> None:
    src.seek(start)
    while length > 0:
        chunk = src.read(min(length, 1 << 24))
        if not chunk:
            raise PatchFormatError(f"{src.name}: changed while being read")
        dst.write(chunk)
        length -= len(chunk)


def _write_like(template: Path, path: Path, tensors: Mapping[str, torch.Tensor], layout: tuple[int, list]) -> None:
    """``template``'s header and any bytes between tensors verbatim, each tensor's bytes at its offset."""
    data_start, entries = layout
    with open(template, "rb") as src, atomic_writer(path) as f:
        _copy_range(src, f, 0, data_start)
        pos = 0
        for name, b, e in entries:
            _copy_range(src, f, data_start + pos, b - pos)
            buf = tensors[name].reshape(-1).view(torch.uint8).numpy()
            if len(buf) != e - b:
                raise PatchFormatError(f"{template}: tensor {name!r} has {e - b} bytes in the header, {len(buf)} here")
            f.write(buf.data)
            pos = e
        src.seek(data_start + pos)
        shutil.copyfileobj(src, f)


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                         metadata: Mapping[str, str] | None = None, template: str | os.PathLike | None = None) -> Path:
    """Write a state dict as a ``.safetensors`` file, atomically (temp file + rename) and deterministically.

    ``template``: the checkpoint ``state`` was loaded from. When it holds the same names, dtypes and shapes, its
    header is kept verbatim (the user's ``__metadata__``, key order, padding) and each tensor is written at its old
    offset, so the file differs from the template only in the tensors that changed; otherwise its metadata is kept
    in a fresh file. ``metadata`` (string → string; default ``{"format": "pt"}``, or the template's) is written
    with its keys sorted. Tensors that share storage (tied weights, views) are cloned so safetensors accepts them.
    Raises :class:`PatchFormatError` for a path not ending in ``.safetensors`` or an unreadable template,
    :class:`PatchError` for a non-tensor entry or non-string metadata.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise PatchFormatError(f"{path}: slugkit writes checkpoints only as .safetensors (never pickle); "
                               f"use a path ending in .safetensors")
    tensors = _prepared(state)
    if template is not None:
        template = Path(template)
        layout = _template_layout(template, tensors)
        if layout is not None and metadata is None:
            _write_like(template, path, tensors, layout)
            return path
        if metadata is None:
            metadata = _checked_header(template).get("__metadata__") or {}
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise PatchError(f"safetensors metadata must map strings to strings, not {meta!r}")
    data = safetensors.torch.save(tensors, metadata=meta or None)
    atomic_write_bytes(path, _sorted_metadata(data) if len(meta) > 1 else data)
    return path
