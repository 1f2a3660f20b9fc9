"""Combining patches: :func:`compose_patches` (disjoint edits of one base, all-or-nothing), :func:`chain_patches`
(edits made one after another, folded into one) and :func:`apply_patches`. A combined patch keeps the architecture
facts its parts record (they must agree; :mod:`slugkit.patch.architecture`).
"""

from __future__ import annotations

import os

import torch

from ..common.text import printable
from .format import Patch, PatchError, _base_label, _normalise_meta, _short, tensor_sha256
from .ops import _provenance, apply_patch, as_patch, make_patch

# --------------------------------------------------------------------------------------------------- compose


def _common_architecture(patches: list[Patch]) -> dict:
    """``{"architecture": facts}`` shared by the patches that record it ({} when none does); raises
    :class:`PatchError` when two record different facts (they were made on models of different architectures)."""
    recorded = [p for p in patches if p.meta.get("architecture")]
    for p in recorded[1:]:
        if p.meta["architecture"] != recorded[0].meta["architecture"]:
            raise PatchError(f"cannot combine patches made on models of different architecture: concept "
                             f"{said(recorded[0].concept)} {recorded[0].meta['architecture']!r} vs concept "
                             f"{said(p.concept)} "
                             f"{p.meta['architecture']!r}")
    return {"architecture": dict(recorded[0].meta["architecture"])} if recorded else {}


def _base(meta: dict):
    """The patch's base model for comparison: a dict without ``precision`` is an fp32 one (`slug demo --target vlm`
    recorded none, `slug unlearn` "fp32", and their patches of the same model could not be composed; trial 26)."""
    base = meta.get("base_model")
    return {"precision": "fp32", **base} if isinstance(base, dict) else base


def compose_patches(patches: list[Patch]) -> Patch:
    """Merge patches that edit disjoint tensors of the same base model into one patch.

    The result's ``meta['components']`` lists each part (concept, method, step_size, metrics, tensors and
    ``fingerprint`` = sha256 of its canonical meta); ``concept`` is the list of the components' concepts and
    ``method`` is ``"composed"``. Composing composed patches flattens the components. Raises
    :class:`PatchError` when two patches touch the same tensor (naming it and both concepts), or were made for
    different base models / adapters / architectures (``meta['architecture']``, kept in the result). A single patch
    is returned unchanged.
    """
    # a Patch is not iterable (trial 28); a folder path was returned as "the composed patch" (trial 30)
    patches = [as_patch(p) for p in ([patches] if isinstance(patches, (Patch, str, os.PathLike)) else patches)]
    if not patches:
        raise PatchError("compose_patches needs at least one patch")
    if len(patches) == 1:
        return patches[0]
    first = patches[0].meta
    owner: dict[str, Patch] = {}
    for p in patches:
        if _base(p.meta) != _base(first) or p.meta.get("adapter") != first.get("adapter"):
            raise PatchError(f"cannot compose patches made for different base models: "
                             f"{printable(_base_label(first))} ({printable(first.get('adapter'))}) vs "
                             f"{printable(_base_label(p.meta))} ({printable(p.meta.get('adapter'))})")
        for name in p.names:
            if name in owner and owner[name].fingerprint == p.fingerprint:
                raise PatchError(f"the same patch (concept {printable(p.concept)!r}, fingerprint {p.fingerprint[:12]}) "
                                 "is given twice; give it once")
            if name in owner:
                early, late = owner[name].meta["tensors"][name], p.meta["tensors"][name]
                if early["sha256_original"] == late["sha256_patched"]:  # a chain given last step first (trial 38)
                    raise PatchError(f"patches overlap on tensor {name!r}: the patch for {said(owner[name].concept)} "
                                     f"was made on top of the one for {said(p.concept)} (steps of a sequential "
                                     "run): give them in the order they were made")
                raise PatchError(f"patches overlap on tensor {name!r}: concept {said(owner[name].concept)} and "
                                 f"concept {said(p.concept)} both edit it; apply one, or re-run unlearning for both "
                                 "concepts")
            owner[name] = p

    components: list[dict] = []
    for p in patches:
        if p.meta.get("method") == "composed" and p.meta.get("components"):
            components.extend(p.meta["components"])
        else:
            components.append({"concept": p.meta.get("concept"), "method": p.meta.get("method"),
                               "step_size": p.meta.get("step_size"), "metrics": p.meta.get("metrics", {}),
                               "tensors": p.names, "fingerprint": p.fingerprint})
    meta = {
        **_provenance(),
        **_common_architecture(patches),
        "base_model": first.get("base_model"),
        "adapter": first.get("adapter"),
        "concept": [c["concept"] for c in components],
        "method": "composed",
        "step_size": None,
        "metrics": {},
        "extra": {},
        "components": components,
        "tensors": {n: owner[n].meta["tensors"][n] for n in sorted(owner)},
    }
    return Patch(original={n: owner[n].original[n] for n in sorted(owner)},
                 patched={n: owner[n].patched[n] for n in sorted(owner)},
                 meta=_normalise_meta(meta))


def chain_patches(patches: list[Patch]) -> Patch:
    """Fold patches made **one after another** (each on the model the previous one produced) into one patch from
    the first base to the final weights — sequential unlearning of several concepts.

    Unlike :func:`compose_patches`, the patches may touch the same tensor: a later patch must then have been made on
    top of the earlier one (its ``sha256_original`` equals the chain's current ``sha256_patched``), else
    :class:`PatchError`, as are steps of different adapters or recorded architectures (the shared
    ``meta['architecture']`` is kept). ``meta['components']`` lists the steps in order; ``method`` is ``"chained"``.
    """
    patches = list(patches)
    if not patches:
        raise PatchError("chain_patches needs at least one patch")
    first = patches[0].meta
    originals: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}
    for p in patches:
        if p.meta.get("adapter") != first.get("adapter"):
            raise PatchError(f"cannot chain patches of different adapters: {printable(first.get('adapter'))} vs "
                             f"{printable(p.meta.get('adapter'))}")
        for name in p.names:
            if name in current:
                want = p.meta["tensors"][name]["sha256_original"]
                if tensor_sha256(current[name]) != want:
                    raise PatchError(f"patch for {said(p.concept)} was not made on top of the earlier patches: tensor "
                                     f"{name!r} differs from what they produce ({_short(want)}…)")
            else:
                originals[name] = p.original[name]
            current[name] = p.patched[name]
    changed = {n: t for n, t in current.items() if tensor_sha256(t) != tensor_sha256(originals[n])}
    components = [{"concept": p.meta.get("concept"), "method": p.meta.get("method"),
                   "step_size": p.meta.get("step_size"), "metrics": p.meta.get("metrics", {}), "tensors": p.names,
                   "fingerprint": p.fingerprint} for p in patches]
    chained = make_patch(originals, changed, base_model=first.get("base_model") or {"id": "unknown"},
                         adapter=first.get("adapter", ""), concept=[c["concept"] for c in components],
                         method="chained", extra={"order": [c["concept"] for c in components]},
                         architecture=_common_architecture(patches).get("architecture"))
    chained.meta["components"] = components
    chained.meta = _normalise_meta(chained.meta)
    return chained


def combine_patches(patches: list[Patch]) -> Patch:
    """One patch for patches applied together: :func:`chain_patches` when they are the steps of a sequential run
    given in the order they were made (every tensor two of them edit: the later one's original is the earlier one's
    result, by sha256; all of one base model), else :func:`compose_patches` (disjoint edits; its errors). A single
    :class:`Patch` (or a patch folder) is taken as a list of one. (``slug apply --patch 1-A/patch --patch 2-B/patch``
    refused the steps of a sequential run as overlapping; trial 38.)"""
    patches = [as_patch(p) for p in ([patches] if isinstance(patches, (Patch, str, os.PathLike)) else patches)]
    last: dict[str, str] = {}  # tensor -> sha256 of the values the patches so far leave in it
    chained = False
    for p in patches:
        if _base(p.meta) != _base(patches[0].meta):
            return compose_patches(patches)  # says which bases differ
        for name in p.names:
            info = p.meta["tensors"][name]
            if name in last:
                if info["sha256_original"] != last[name]:
                    return compose_patches(patches)  # an overlap that is no chain: refused, naming both
                chained = True
            last[name] = info["sha256_patched"]
    return chain_patches(patches) if chained else compose_patches(patches)


def said(concept) -> str:
    """A patch's concept for a message: ``'A'``, or ``'A' + 'B'`` for a several-concept patch (a list's repr was
    printed: trial 38)."""
    return " + ".join(repr(printable(c)) for c in concept) if isinstance(concept, list) else repr(printable(concept))


def apply_patches(target, patches: list[Patch], *, check: bool = True):
    """Apply several patches all-or-nothing (:func:`combine_patches`: disjoint ones, or a sequential run's steps in
    order): everything is checked before any tensor is written. A single :class:`Patch` (or a patch folder) is taken
    as a list of one."""
    return apply_patch(target, combine_patches(patches), check=check)


