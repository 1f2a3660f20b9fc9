"""Probe 3, precision: does the removal survive the reduced precision a user deploys the model in?

Each condition is applied to a copy of the unedited and of the patched model, which are then scored the same way
(the run's templates, every identity's class; the concept's test images):

* ``fp16`` / ``bf16``: every floating tensor rounded to that dtype and back (the model stored or shipped in half
  precision; the forwards then run in float32 so that only the rounding of the weights is measured — a CPU has no
  fp16 matmul);
* ``bf16-autocast``: weights float32, every forward under ``torch.autocast(bfloat16)`` (the compute precision);
* ``int8`` / ``int4``: **weight-only** symmetric per-output-channel rounding of every floating tensor with ≥ 2
  dimensions (scale = max |w| of the row / (2^(b−1) − 1)), the scheme of int8/int4 weight-only quantisers
  (bitsandbytes, torchao). Every matrix is rounded, including open_clip's ``visual.proj`` and attention ``in_proj``
  which are no ``nn.Linear`` modules;
* ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights and activations of the ``nn.Linear``
  modules it supports); listed as skipped, with the reason, where this torch build does not provide it.

A condition whose unedited copy no longer names the concept (≥ 50 % top-1) is uninformative: the rounding broke
the model, not the removal. Graded number: the worst informative condition's top-1 after the patch.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from .base import AuditThresholds, grade_worst
from .data import AuditData
from .score import class_weights, hit_rates, image_features, name_prompts

CONDITIONS = ("fp16", "bf16", "bf16-autocast", "int8", "int4", "int8-dynamic")


@torch.no_grad()
def round_weights(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """Round ``model`` in place and return it: ``fp16``/``bf16``: every floating parameter and buffer cast and back;
    ``int8``/``int4``: weight-only symmetric rounding, per row (dim 0), of every floating **parameter** with ≥ 2 dims
    (buffers such as an attention mask with −inf entries are left alone). Raises ``ValueError`` for another ``how``.

    Per row: for ``nn.Linear`` (out x in) that is per output channel; for a matrix used as ``x @ P`` (open_clip's
    ``visual.proj``, ``text_projection``) it is per input row — a finer grid than per-tensor either way."""
    if how not in ("fp16", "bf16", "int8", "int4"):
        raise ValueError(f"unknown rounding {how!r}")
    if how in ("fp16", "bf16"):
        half = torch.float16 if how == "fp16" else torch.bfloat16
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(half).to(t.dtype))
        return model
    for t in model.parameters():  # weights only: buffers such as an attention mask (-inf entries) are no weights
        if t.is_floating_point() and t.dim() >= 2:
            t.copy_(quantize_rows(t, 8 if how == "int8" else 4))
    return model


def quantize_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row (dim 0) rounding of ``w`` to ``bits``-bit integers and back: ``round(w / s) · s``,
    ``s = max|w_row| / (2^(bits−1) − 1)``; all-zero rows stay zero. Same shape and dtype as ``w``."""
    q = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1).float()
    s = flat.abs().amax(dim=1, keepdim=True) / q
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(flat / s).clamp(-q, q) * s).reshape(w.shape).to(w.dtype)


def _dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of its quantized tensors
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@contextlib.contextmanager
def under_condition(adapter, how: str):
    """``adapter`` with its model replaced by a rounded copy (or its forwards under bf16 autocast) for the block;
    the original model is restored after (it is never modified)."""
    original, orig_autocast = adapter.model, getattr(adapter, "precision", "fp32")
    try:
        if how == "bf16-autocast":
            adapter.precision = "bf16"
        elif how == "int8-dynamic":
            adapter.model = _dynamic_int8(copy.deepcopy(original).cpu())
        else:
            adapter.model = round_weights(copy.deepcopy(original), how)
        yield adapter
    finally:
        adapter.model, adapter.precision = original, orig_autocast


def _score(adapter, data: AuditData) -> dict:
    w = class_weights(adapter, name_prompts(data.names, data.templates))
    return hit_rates(image_features(adapter, data.test[data.concept]), w, data.concept_index)


def probe_precision(before, after, data: AuditData, thresholds: AuditThresholds = AuditThresholds(),
                    conditions=CONDITIONS) -> dict:
    """Run probe 3; returns the probe record (``rows``: per condition ``before``/``after`` top-1/top-5 and
    ``informative``, or ``skipped`` with the reason)."""
    t0 = time.perf_counter()
    rows = [{"condition": "fp32", "before": _score(before, data), "after": _score(after, data)}]
    for how in conditions:
        if how == "int8-dynamic" and before.device.type != "cpu":
            rows.append({"condition": how, "skipped": "torch's dynamic quantisation runs on the CPU only"})
            continue
        row = {"condition": how}
        try:
            for tag, m in (("before", before), ("after", after)):
                with under_condition(m, how):
                    row[tag] = _score(m, data)
        except (RuntimeError, ImportError, NotImplementedError, AssertionError, AttributeError,
                TypeError) as e:  # a torch build without it, or a model that cannot run quantised modules
            rows.append({"condition": how, "skipped": "torch's dynamically quantised modules cannot run this model "
                                                      "(e.g. open_clip reads Linear weights directly; the int8 weight "
                                                      f"rounding above covers int8): {type(e).__name__}: "
                                                      f"{str(e).splitlines()[0][:160]}"})
            continue
        row["informative"] = row["before"]["top1"] >= thresholds.informative_at
        rows.append(row)
    informative = [r for r in rows[1:] if r.get("informative")]
    rec = {"probe": "precision", "gating": True, "rows": rows, "seconds": time.perf_counter() - t0,
           "tried": "weights rounded to " + ", ".join(r["condition"] for r in rows[1:]
                                                       if r["condition"] != "bf16-autocast" and "skipped" not in r)
                    + "; bf16 autocast of every forward"
                    + "".join(f"; {r['condition']} skipped" for r in rows if "skipped" in r),
           "budget": {"conditions": len(conditions), "images": int(data.test[data.concept].shape[0])}}
    worst = grade_worst(rec, informative, thresholds.precision, "precision",
                        "no reduced precision kept the unedited model naming the concept: the probe cannot tell")
    if worst is not None:
        value = worst["after"]["top1"]
        rec.update(worst={"condition": worst["condition"], "before": worst["before"]["top1"], "after": value},
                   summary=f"worst {worst['condition']}: top-1 {worst['before']['top1']:.2f} -> {value:.2f} "
                           f"(fp32 {rows[0]['after']['top1']:.2f})"
                           + (f"; {rec['tied']} conditions tied at {value:.2f}" if rec.get("tied") else ""))
    return rec
