"""Loading a model leaves torch's global random state as it was.

Building a module draws its random initialisation from torch's global generator before the saved weights replace
it, so every load moved the caller's random state: a script that seeded torch, loaded the embedded text-to-image
pipeline and then sampled got other numbers than one that loaded first (the loaders of :mod:`slugkit.models` and
:mod:`slugkit.world`). Every slugkit method seeds its own ``torch.Generator``; this keeps the caller's state theirs.
"""

from __future__ import annotations

import functools

__all__ = ["keeps_torch_rng"]


def keeps_torch_rng(fn):
    """Decorate a loader so that torch's CPU random state (and CUDA's, where CUDA is initialised) is restored after
    it returns or raises (:func:`torch.random.fork_rng`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper
