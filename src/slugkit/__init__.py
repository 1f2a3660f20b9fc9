"""slugkit: targeted unlearning with SLUG (Single Layer Unlearning Gradient, ICML 2025).

Public API::

    from slugkit import load_model, unlearn, UnlearnConfig, load_patch, apply_patch, revert_patch
"""

from __future__ import annotations

__version__ = "0.1.0"

_PATCH_API = ("Patch", "apply_patch", "apply_patches", "compose_patches", "load_patch", "revert_patch", "save_patch")


def load_model(model: str = "embedded", pretrained: str | None = None, **kw):
    """Load a model adapter (open_clip ids, ``hf-hub:``/``local-dir:`` ids, local checkpoints, ``embedded``)."""
    from .models import load_adapter

    return load_adapter(model, pretrained, **kw)


def unlearn(config):
    """Run SLUG end to end (see :class:`slugkit.unlearn.UnlearnConfig`); returns the result dict."""
    from .workflows.unlearn import run_unlearn

    return run_unlearn(config)


def __getattr__(name):
    """Lazy public names: ``import slugkit`` (and ``slug --help``, ``slug --version``, a usage error) does not import
    torch (1.7 s); the first use of a name below does."""
    if name in _PATCH_API:
        from . import patch

        return getattr(patch, name)
    if name == "UnlearnConfig":
        from .workflows.unlearn import UnlearnConfig

        return UnlearnConfig
    if name == "SearchConfig":
        from .slug.search import SearchConfig

        return SearchConfig
    raise AttributeError(name)


__all__ = ["Patch", "apply_patch", "apply_patches", "compose_patches", "load_patch", "revert_patch", "save_patch",
           "load_model", "unlearn", "UnlearnConfig", "SearchConfig"]
