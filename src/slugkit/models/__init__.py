"""Model adapters, registered by family name. ``load_adapter`` picks the family from the id."""

from __future__ import annotations

from .base import PRECISIONS, Adapter, ModelLoadError, Stage, autocast_dtype
from .hf_clip import HFClipAdapter
from .open_clip import OpenClipAdapter

ADAPTERS = {"open_clip": OpenClipAdapter, "hf_clip": HFClipAdapter}


def load_adapter(model: str = "embedded", pretrained: str | None = None, family: str = "open_clip", *,
                 precision: str = "fp32", **kw) -> Adapter:
    """Load ``model`` (+ ``pretrained``) with the adapter of ``family`` (default open_clip); ``kw``: ``device``,
    ``cache_dir``.

    ``precision`` is one of ``fp32``, ``bf16``, ``fp16`` for every family and means the same thing everywhere: the
    weights are float32 in memory (the patch and its hashes are of the float32 weights, so a patch made with bf16
    applies to the same float32 model), and the forward passes of the gradient pass and of evaluation run under
    ``adapter.autocast()`` = ``torch.autocast(device.type, dtype)``, with float32 losses, gradients and sums
    (:mod:`slugkit.models.base`). Raises ``ValueError`` for an unknown family or precision (naming the valid ones),
    before any file is read; for ``fp16`` on the CPU ("--precision fp16 needs a CUDA device; use bf16 on CPU") and an
    autocast this torch cannot run on the device; :class:`ModelLoadError` when the model cannot be loaded.
    """
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; available: {sorted(ADAPTERS)}")
    autocast_dtype(precision)
    return ADAPTERS[family].load(model, pretrained, precision=precision, **kw)


__all__ = ["PRECISIONS", "Adapter", "ModelLoadError", "Stage", "OpenClipAdapter", "HFClipAdapter", "ADAPTERS",
           "load_adapter"]
