"""What a weights file really is, decided by parsing it — never by a first-byte guess.

A safetensors file is 8 bytes of little-endian header length ``n`` followed by ``n`` bytes of a JSON object whose
entries (other than ``__metadata__``) have ``dtype``, ``shape`` and ``data_offsets`` that fit in the rest of the
file. Its first byte is the low byte of ``n`` and can be anything — 0x80 included (``n ≡ 128 mod 256``, about one
file in 256), which a "0x80 means pickle" rule refuses wrongly. So the order here is: a Git LFS pointer (a small text
file, what ``git clone`` leaves without ``git lfs``), then a safetensors header that parses and fits, then the known
pickle signatures (zip archive of ``torch.save``, raw pickle protocol 2+), else "not a safetensors file".

:func:`check_weights_file` raises :class:`WeightsFileError` (a ``ValueError``) whose message names the file and says
what to do; callers re-raise it as their own error class where they have one.
"""

from __future__ import annotations

import json
import errno
import os
import struct
from pathlib import Path

__all__ = ["LFS_POINTER_PREFIX", "WeightsFileError", "check_weights_file", "safetensors_header"]

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header (100 MB)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsFileError(ValueError):
    """A weights file is not a readable safetensors file (pickle, LFS pointer, truncated, other format)."""


def _converted(path: Path) -> Path:
    """Where the conversion the pickle error suggests should write: never over the input (a pickle named
    ``x.safetensors`` was told to save to itself; its lines printed a literal ``\\n``: eleventh trial)."""
    out = path.with_suffix(".safetensors")
    return out if out != path else path.with_name(path.stem + ".converted.safetensors")


def safetensors_header(path: str | os.PathLike) -> dict | None:
    """The parsed JSON header of ``path`` if it is a structurally valid safetensors file (header length within the
    file, JSON object, every tensor's byte range inside the data section and matching its dtype and shape), else
    None. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            return None
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                return None
            continue
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            return None
        if not (0 <= begin <= end <= data) or end - begin != numel * width:
            return None
    return header


def check_weights_file(path: str | os.PathLike, what: str = "weights file") -> dict:
    """The safetensors header of ``path`` (see :func:`safetensors_header`); raises :class:`WeightsFileError` naming the
    file and the cause otherwise, or ``FileNotFoundError`` when it does not exist. ``what`` names the file's role in
    messages (e.g. ``"checkpoint"``)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        raise IsADirectoryError(errno.EISDIR, f"is a folder; the {what} is a .safetensors file"
                                + (f" (this folder holds {', '.join(inside[:3])})" if inside else ""), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        start = f.read(256)
    if start.startswith(LFS_POINTER_PREFIX):
        raise WeightsFileError(f"{path}: is a Git LFS pointer ({path.stat().st_size} bytes), not the weights; fetch "
                               f"them with `git lfs pull` in that repository (or download the file again)")
    header = safetensors_header(path)
    if header is not None:
        return header
    if start[:4] == b"PK\x03\x04" or (start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise WeightsFileError(
            f"{path}: is a pickle checkpoint (torch.save), not safetensors. slugkit never unpickles files, because "
            f"unpickling can run arbitrary code. If you trust this file, convert it yourself, e.g. `python -c "
            f"\"import torch, safetensors.torch; sd = torch.load({str(path)!r}, map_location='cpu', "
            f"weights_only=True); safetensors.torch.save_file(sd, {str(_converted(path))!r})\"` (unwrap a nested "
            f"'state_dict' key first if there is one), and pass the .safetensors file instead.")
    if not start:
        raise WeightsFileError(f"{path}: is empty; the {what} was not written completely")
    raise WeightsFileError(f"{path}: is not a safetensors file (its header does not parse or its tensors do not fit "
                           f"in its {path.stat().st_size} bytes: truncated or another format); slugkit reads "
                           f"{what}s as .safetensors only")
