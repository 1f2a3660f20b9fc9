"""Baseline unlearning methods behind one interface (:class:`slugkit.methods.base.Method`), by registry name.

``make_method("gaft", lr=1e-5)`` builds one; ``METHODS`` maps names to classes. SLUG itself is not here: it runs
through :func:`slugkit.unlearn.run_unlearn` (``slugkit.compare`` calls it), so its numbers are those of
``slug unlearn``.
"""

from __future__ import annotations

from functools import partial

from .base import LR_GRID, LRSweep, Method, MethodData, MethodResult, Passes, select_epoch
from .ft import FT
from .ga import GA
from .gaft import GAFT
from .salun import SalUn, saliency_mask
from .ssd import ALPHA_GRID, LAMBDA_GRID, SSD, dampen

METHODS = {
    "ft": FT,
    "ga": GA,
    "gaft": GAFT,
    "salun": SalUn,
    "salun-rl": partial(SalUn, update="rl"),
    "ssd": SSD,
    "ssd-cumulative": partial(SSD, cumulative=True),
}


def make_method(name: str, **kw) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: slug, {', '.join(METHODS)}")
    kw = {k: v for k, v in kw.items() if v is not None}
    return METHODS[name](**kw)


__all__ = ["METHODS", "make_method", "LRSweep", "LR_GRID", "ALPHA_GRID", "LAMBDA_GRID", "Method", "MethodData",
           "MethodResult", "Passes", "select_epoch", "FT", "GA", "GAFT", "SalUn", "SSD", "saliency_mask", "dampen"]
