"""Operations on patches: make one from a model, apply, revert, compose and chain (spec §5: a layer is one tensor,
a patch a few of them). Targets are ``nn.Module`` objects or state dicts; every check runs before any tensor is
written, so a refused operation leaves the target untouched.

**Half precision.** A target whose floating tensors have another dtype than the patch's (an fp16 / bf16 model or
checkpoint, an SD pipeline's fp16 text encoder) gets the patch cast to its dtype first (:func:`cast_patch`: original
and patched values, ``Tensor.to``), and the hash check compares against the *cast* originals: it passes when the
target holds the base weights rounded to its dtype, which is how half-precision variants are made. Revert then
restores exactly the bytes the target held. An edit that rounds away entirely in the lower precision is refused.
"""

from __future__ import annotations

import difflib
import os
from typing import Iterable, Mapping

import torch
from torch import nn

from ..common.text import printable
from .architecture import check_architecture
from .format import (_DTYPES, FORMAT, FORMAT_VERSION, Patch, PatchError, PatchMismatchError, _base_label, _dtype_name,
                     _normalise_meta, _short, tensor_sha256)


def _toolkit_version() -> str:
    """slugkit's installed version (patch.json's ``toolkit_version``; "0+unknown" when run from a bare checkout)."""
    from importlib import metadata

    try:
        return metadata.version("slugkit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def save_patch(patch: Patch, out_dir: str | os.PathLike, overwrite: bool = False):
    """:func:`slugkit.patch.format.save_patch` (the folder written whole; its errors), refusing first an ``out_dir``
    inside the slugkit package, a run's folder or a folder inside one — ``RUN/patch`` with ``overwrite=True``
    replaced a finished run's patch under its ``result.json`` — with ``ValueError`` naming ``out_dir (--out)``
    (:func:`slugkit.common.outputs.patch_out_refusal`; a run's own temporary folder is its to write)."""
    from ..common.outputs import patch_out_refusal
    from .format import save_patch as write

    why = patch_out_refusal(out_dir) if isinstance(out_dir, (str, os.PathLike)) and os.fspath(out_dir).strip() else None
    if why:
        raise ValueError(f"save_patch: {why}")
    return write(patch, out_dir, overwrite)


# --------------------------------------------------------------------------------------------------- target access


def _named_tensors(target: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name → live tensor of a module (parameters, then buffers, then other state-dict entries) or a dict.

    The tensors returned share storage with the target, so an in-place ``copy_`` edits the target.
    """
    if isinstance(target, nn.Module):
        out: dict[str, torch.Tensor] = dict(target.named_parameters())
        for name, buf in target.named_buffers():
            out.setdefault(name, buf)
        for name, t in target.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                out.setdefault(name, t)
        return out
    if isinstance(target, Mapping):
        bad = [k for k, v in target.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise PatchError(f"state dict entries must be tensors; not a tensor: {bad[:5]}")
        return dict(target)
    raise TypeError(f"target must be an nn.Module, a dict of tensors or a slugkit adapter, not "
                    f"{type(target).__name__}" + (" (pass slugkit.integrations.diffusers_sd.apply_patch_to_pipeline "
                                                  "a pipeline)" if hasattr(target, "text_encoder") else ""))


def model_of(target):
    """A slugkit adapter (``slugkit.load_model``) stands for its ``.model``; anything else is itself (trial 28: an
    adapter was refused as "not an nn.Module")."""
    model = getattr(target, "model", None)
    return model if isinstance(model, nn.Module) and hasattr(target, "candidate_names") else target


def as_patch(patch) -> Patch:
    """``patch`` itself, or the patch loaded from a folder path (``str`` / ``os.PathLike``: :func:`load_patch`);
    ``TypeError`` for anything else (a path said "'str' object has no attribute 'meta'": trial 29)."""
    if isinstance(patch, Patch):
        return patch
    if isinstance(patch, (str, os.PathLike)):
        from .format import load_patch

        return load_patch(patch)
    raise TypeError(f"patch must be a slugkit Patch or a patch folder (slugkit.load_patch), not {type(patch).__name__}")


def _missing_hint(missing: Iterable[str], available: Iterable[str]) -> str:
    available = list(available)
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, available, n=2, cutoff=0.75)
        if f"module.{name}" in available:
            close = [f"module.{name}"]
        elif name.startswith("module.") and name.removeprefix("module.") in available:
            close = [name.removeprefix("module.")]
        if close:
            hints.append(f"{name!r} (did you mean {', '.join(map(repr, close))}?)")
        else:
            hints.append(repr(name))
    return ", ".join(hints)


# --------------------------------------------------------------------------------------------------- make


def _provenance() -> dict:
    """The first entries of every ``patch.json``: format, its version, and who wrote it with which torch."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": "slugkit",
            "toolkit_version": _toolkit_version(), "torch_version": torch.__version__}


def make_patch(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    patched: Mapping[str, torch.Tensor],
    *,
    base_model: dict | str,
    adapter: str,
    concept: str | list,
    method: str = "slug",
    step_size: float | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    architecture: Mapping | None = None,
) -> Patch:
    """Build a :class:`Patch` from the unmodified model and the new values of the edited tensors.

    ``model_or_state`` must still hold the *original* values (the patch records their hashes and bytes);
    ``patched`` maps tensor name → new value, same shape and dtype. All tensors are cloned to the CPU.
    ``base_model`` identifies the checkpoint (e.g. ``{"id": "ViT-B-32", "pretrained": "openai"}``; a string
    is taken as ``{"id": ...}``). ``metrics`` / ``extra`` must be JSON-serialisable (numpy/torch scalars are
    converted). ``architecture``: the facts of the model the patch is made on that change its outputs
    (:func:`slugkit.patch.architecture_facts`), recorded as ``meta['architecture']`` and checked by
    :func:`apply_patch` (omitted when None or empty). Raises :class:`PatchError` for an unknown name, a
    shape/dtype mismatch, a tensor the patch leaves unchanged, non-finite new values where the original is finite,
    or an ``architecture`` that is not a flat mapping of names to strings / numbers / booleans.
    """
    if not patched:
        raise PatchError("a patch needs at least one tensor; `patched` is empty")
    if isinstance(base_model, str):
        base_model = {"id": base_model}
    if not isinstance(base_model, Mapping) or not base_model:
        raise PatchError("base_model must be a non-empty dict identifying the checkpoint, e.g. {'id': 'ViT-B-32'}")
    live = _named_tensors(model_or_state)
    missing = [n for n in sorted(patched) if n not in live]
    if missing:
        raise PatchError(f"the model has no tensor named {_missing_hint(missing, live)}")

    original_out: dict[str, torch.Tensor] = {}
    patched_out: dict[str, torch.Tensor] = {}
    tensors_meta: dict[str, dict] = {}
    for name in sorted(patched):
        new = patched[name]
        if not isinstance(new, torch.Tensor):
            raise PatchError(f"patched value of {name!r} must be a tensor, not {type(new).__name__}")
        cur = live[name]
        if tuple(new.shape) != tuple(cur.shape):
            raise PatchError(f"patched value of {name!r} has shape {tuple(new.shape)}, the model's has "
                             f"{tuple(cur.shape)}")
        if new.dtype != cur.dtype:
            raise PatchError(f"patched value of {name!r} is {_dtype_name(new.dtype)}, the model's is "
                             f"{_dtype_name(cur.dtype)}; cast it before making the patch")
        if _dtype_name(cur.dtype) not in _DTYPES:
            raise PatchError(f"tensor {name!r} has dtype {cur.dtype}, which a patch cannot store")
        orig_c = cur.detach().to("cpu", copy=True).contiguous()
        new_c = new.detach().to("cpu", copy=True).contiguous()
        if orig_c.is_floating_point() and bool(torch.isfinite(orig_c).all()) and not bool(torch.isfinite(new_c).all()):
            raise PatchError(f"patched value of {name!r} contains NaN/inf; the step size is probably too large")
        sha_o, sha_p = tensor_sha256(orig_c), tensor_sha256(new_c)
        if sha_o == sha_p:
            raise PatchError(f"patched value of {name!r} is identical to the model's; drop it from the patch "
                             f"(or check that the model still holds the original, unedited weights)")
        original_out[name], patched_out[name] = orig_c, new_c
        tensors_meta[name] = {"shape": list(cur.shape), "dtype": _dtype_name(cur.dtype),
                              "sha256_original": sha_o, "sha256_patched": sha_p}

    if architecture:
        if not isinstance(architecture, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))
                for k, v in architecture.items()):
            raise PatchError(f"architecture must map fact names to strings / numbers, e.g. "
                             f"{{'text.activation': 'gelu'}}, not {architecture!r}")
    meta = {
        **_provenance(),
        **({"architecture": dict(architecture)} if architecture else {}),
        "base_model": dict(base_model),
        "adapter": str(adapter),
        "concept": concept,
        "method": str(method),
        "step_size": None if step_size is None else float(step_size),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
        "tensors": tensors_meta,
    }
    return Patch(original=original_out, patched=patched_out, meta=_normalise_meta(meta))


# --------------------------------------------------------------------------------------------------- apply / revert


def _verify_state(live: dict[str, torch.Tensor], patch: Patch, want: str, *,
                  check_hash: bool = True) -> dict[str, torch.Tensor]:
    """Check every tensor of ``patch`` in ``live`` (:func:`_named_tensors` of the target) before anything is touched;
    return name → live tensor. ``want`` is ``"original"`` (for apply) or ``"patched"`` (for revert). Raises
    :class:`PatchMismatchError` listing every problem.
    """
    tmeta = patch.meta["tensors"]
    base = printable(_base_label(patch.meta))
    concept = patch.meta.get("concept")
    concept = " + ".join(map(str, concept)) if isinstance(concept, list) else concept  # no list repr (verify 41)
    verb = "apply" if want == "original" else "revert"
    missing = [n for n in sorted(tmeta) if n not in live]
    if missing:
        raise PatchMismatchError(
            f"cannot {verb} patch (concept {concept!r}): the model has no tensor named {_missing_hint(missing, live)}; "
            f"load the base model the patch was made for: {base} (adapter {patch.meta.get('adapter')!r})")
    problems: list[str] = []
    layout = 0
    already = 0
    not_applied = 0
    for name in sorted(tmeta):
        info, t = tmeta[name], live[name]
        if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
            problems.append(f"tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)} in the model, the patch "
                            f"expects {info['dtype']}{info['shape']}")
            layout += 1
            continue
        if not check_hash:
            continue
        sha = tensor_sha256(t)
        if sha == info[f"sha256_{want}"]:
            continue
        other = "patched" if want == "original" else "original"
        if sha == info[f"sha256_{other}"]:
            if want == "original":
                already += 1
                problems.append(f"tensor {name!r} already holds the patched values")
            else:
                not_applied += 1
                problems.append(f"tensor {name!r} holds the original values")
        else:
            problems.append(f"tensor {name!r}: expected sha256 {_short(info[f'sha256_{want}'])}, found {_short(sha)}")
    if not problems:
        return {n: live[n] for n in sorted(tmeta)}

    if want == "original":
        if already == len(tmeta):
            advice = ("The patch is already applied to this model; nothing to do (`slug revert`, or revert_patch, "
                      "undoes it)")
        elif layout:
            advice = f"Load the base model the patch was made for: {base}"
        else:
            advice = (f"Load the base model the patch was made for: {base}. If this tensor was already patched (by "
                      "this or another patch), revert it first (`slug revert --patch PATCH` with the --model, "
                      "--pipeline or --llava it was applied to)")
        head = f"cannot apply patch (concept {concept!r}) to this model"
    else:
        if not_applied == len(tmeta):
            advice = "The patch is not applied: there is nothing to revert"  # (said twice before: verification 66)
        else:
            advice = (f"The model is not in the patched state: revert only a model this patch was applied to "
                      f"(base: {base})")
        head = f"cannot revert patch (concept {concept!r})"
    if len(tmeta) > 1 and (already if want == "original" else not_applied) == len(tmeta):
        # every tensor in the same state: said once, not per tensor (it said "not applied" three times, 23rd trial)
        state = "the patched values" if want == "original" else "the original values"
        shown = f"each of its {len(tmeta)} tensors ({', '.join(repr(n) for n in sorted(tmeta)[:4])}" + \
            (", …" if len(tmeta) > 4 else "") + f") holds {state}"
    else:
        shown = "; ".join(problems[:8]) + (f"; … and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise PatchMismatchError(f"{head}: {shown}. {advice}. The model was not modified.")


def _copy_all(live: dict[str, torch.Tensor], values: dict[str, torch.Tensor], undo: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into ``live`` in place; if a copy fails, restore the ones done from ``undo``."""
    done: list[str] = []
    with torch.no_grad():
        try:
            for name, dst in live.items():
                dst.copy_(values[name])
                done.append(name)
        except BaseException:
            for name in done:
                live[name].copy_(undo[name])
            raise


def apply_patch(target, patch: Patch, *, check: bool = True):
    """Write the patched values into ``target`` (an ``nn.Module``, a state dict or a slugkit adapter), in place;
    returns ``target``.

    Module tensors are looked up by ``named_parameters()``, then buffers / ``state_dict()`` keys. Before
    anything is written every tensor is checked: it exists, its shape and dtype match, and (``check=True``)
    its sha256 equals the patch's ``sha256_original``. Otherwise :class:`PatchMismatchError` is raised — naming
    the tensor, the expected and found hash prefixes and the base model — and the model is left untouched.
    ``check=False`` skips the hash comparison (for deliberately applying to a fine-tuned relative of the
    base; revert will then restore the *base* values, not the fine-tuned ones) and the architecture check.

    A module is also checked against the patch's recorded ``architecture`` (:func:`check_architecture`: e.g. a
    GELU patch on a QuickGELU model with the same weights is refused, naming both). Floating tensors of another
    dtype than the patch's get the patch cast to theirs first (module docstring, "Half precision"; raises
    :class:`PatchError` when the edit rounds away entirely).
    """
    module, patch = model_of(target), as_patch(patch)
    live = _named_tensors(module)
    if check and isinstance(module, nn.Module):
        check_architecture(module, patch)
    patch = _cast_to(live, patch)
    live = _verify_state(live, patch, "original", check_hash=check)
    _copy_all(live, patch.patched, patch.original)
    return target


def revert_patch(target, patch: Patch):
    """Restore the original values of the patched tensors, bit-exactly; returns ``target``.

    Refuses (:class:`PatchMismatchError`, model untouched) unless every tensor currently holds exactly the
    patched values (cast to the target's dtype, as :func:`apply_patch` wrote them).
    """
    live, patch = _named_tensors(model_of(target)), as_patch(patch)
    patch = _cast_to(live, patch)
    live = _verify_state(live, patch, "patched")
    _copy_all(live, patch.original, patch.patched)
    return target


def cast_patch(patch: Patch, dtypes: Mapping[str, torch.dtype]) -> Patch:
    """``patch`` with each tensor's original and patched values cast to ``dtypes[name]`` (``patch`` itself when no
    dtype changes); hashes are recomputed on the cast values, ``extra['cast_from']`` records the patch's dtypes and
    the rest of ``meta`` is kept. Raises :class:`PatchError` when an edit rounds away entirely in the new dtype."""
    if all(patch.patched[n].dtype == dtypes.get(n, patch.patched[n].dtype) for n in patch.names):
        return patch
    to = {n: dtypes.get(n, patch.patched[n].dtype) for n in patch.names}
    originals = {n: patch.original[n].to(to[n]) for n in patch.names}
    patched = {n: patch.patched[n].to(to[n]) for n in patch.names}
    for n in patch.names:
        if torch.equal(originals[n], patched[n]):
            raise PatchError(f"in {to[n]} the edit of {n!r} rounds away entirely; apply the patch to a "
                             f"{patch.patched[n].dtype} copy of the model instead")
    m = patch.meta
    extra = dict(m.get("extra") or {})
    extra["cast_from"] = {n: m["tensors"][n]["dtype"] for n in patch.names}
    cast = make_patch(originals, patched, base_model=m.get("base_model") or {"id": "unknown"},
                      adapter=m.get("adapter", ""), concept=m.get("concept", ""), method=m.get("method", "slug"),
                      step_size=m.get("step_size"), metrics=m.get("metrics"), extra=extra,
                      architecture=m.get("architecture"))
    if m.get("components"):
        cast.meta = _normalise_meta({**cast.meta, "components": m["components"]})
    return cast


def _cast_to(live: Mapping[str, torch.Tensor], patch: Patch) -> Patch:
    """``patch`` cast to the dtypes of the floating tensors of ``live`` that have its shapes (the others are left
    for :func:`_verify_state` to report)."""
    dtypes = {}
    for n in patch.names:
        t = live.get(n)
        if (t is not None and t.is_floating_point() and patch.patched[n].is_floating_point()
                and tuple(t.shape) == tuple(patch.patched[n].shape)):
            dtypes[n] = t.dtype
    return cast_patch(patch, dtypes)
