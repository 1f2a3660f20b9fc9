"""Checkpoint carriers: a patch applied to a ``.safetensors`` state dict rather than a live model.

slugkit never unpickles: ``.pt``/``.pth``/``.bin``/``.ckpt`` files (and any file whose first bytes are a torch zip
archive or a pickle) are refused with the two lines that convert a trusted one to safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from ..common.files import atomic_write_bytes
from .format import PatchError, PatchFormatError

# Suffixes of pickle-based checkpoints we refuse to open.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _pickle_refusal(path: Path) -> PatchFormatError:
    return PatchFormatError(
        f"{path}: looks like a pickle checkpoint (.pt/.pth/.bin/.ckpt). slugkit never unpickles files, because "
        f"unpickling can run arbitrary code. If you trust this file, convert it yourself, e.g.\n"
        f"    import torch, safetensors.torch\n"
        f"    sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True)\n"
        f"    safetensors.torch.save_file(sd, {str(path.with_suffix('.safetensors'))!r})\n"
        f"(unwrap a nested 'state_dict' key first if there is one), and pass the .safetensors file instead.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` checkpoint into a CPU state dict. Pickle files are refused, never opened as pickle."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / raw pickle
        raise _pickle_refusal(path)
    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except Exception as e:
        raise PatchFormatError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from e


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as a ``.safetensors`` file, atomically (temp file + rename) and deterministically.

    Tensors that share storage (tied weights, views) are cloned so safetensors accepts them.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise PatchFormatError(f"{path}: slugkit writes checkpoints only as .safetensors (never pickle); "
                               f"use a path ending in .safetensors")
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
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    return path
