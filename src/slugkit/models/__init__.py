"""Model adapters, registered by family name. ``load_adapter`` picks the family from the id."""

from __future__ import annotations

from .base import Adapter, ModelLoadError, Stage
from .hf_clip import HFClipAdapter
from .open_clip import OpenClipAdapter

ADAPTERS = {"open_clip": OpenClipAdapter, "hf_clip": HFClipAdapter}


def load_adapter(model: str = "embedded", pretrained: str | None = None, family: str = "open_clip", **kw) -> Adapter:
    """Load ``model`` (+ ``pretrained``) with the adapter of ``family`` (default open_clip)."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; available: {sorted(ADAPTERS)}")
    return ADAPTERS[family].load(model, pretrained, **kw)


__all__ = ["Adapter", "ModelLoadError", "Stage", "OpenClipAdapter", "HFClipAdapter", "ADAPTERS", "load_adapter"]
