"""``slug audit`` from Python: :func:`audit_patch` loads the model and the patch and runs the audit that fits the
patch — :func:`slugkit.audit.run_audit` for a CLIP patch, :mod:`slugkit.audit.downstream` for a patch of the embedded
text-to-image pipeline or VLM — after checking its arguments (trial 29: a str for ``probes``, an unknown keyword or a
VLM patch failed after the model had loaded, or with another concept's error).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import PROBES
from .run import AUDIT_JSON, AUDIT_MD, _verdict_fields, audited_concept, patched_copy, run_audit


_RUN_AUDIT_KW = ("probes", "thresholds", "attack", "relearn", "gate_representation", "progress", "out")
# what the audit of each kind of patch reads, beyond probes/progress/out (the others refused, as `slug audit` does)
_READS = {"CLIP": {"thresholds", "attack", "relearn", "gate_representation", "data", "controls", "aliases",
                   "pretrained", "device", "model", "family"},
          "text-to-image": {"attack", "audit_images", "audit_gen_steps"}, "VLM": {"gate_representation"}}


def audit_patch(patch_path, model: str = "embedded", concept: str | None = None, *,
                pretrained: str | None = None, family: str | None = None, data=None, controls: list[str] | None = None,
                aliases: list[str] | None = None, threads: int | None = None, device: str = "cpu",
                overwrite: bool = False, audit_images: int | None = None, audit_gen_steps: int | None = None,
                **kw) -> dict:
    """Load ``model`` and the patch and :func:`run_audit` (``slug audit``); returns the audit record, also written to
    ``out`` (``kw``) when given. ``patch_path``: a patch folder (or a run folder holding ``patch/``) or a
    :class:`~slugkit.patch.Patch`. ``concept`` defaults to the patch's; ``family`` to the patch's adapter.
    ``data``: an :class:`AuditData`, a callable ``(adapter, concept) -> AuditData`` (called with the loaded base
    model, so a large model is loaded once), or None for the embedded world's data (``controls``/``aliases`` then
    passed on; the embedded model only). ``kw``: :func:`run_audit`'s ``probes`` (a list), ``thresholds``,
    ``attack``, ``relearn``, ``gate_representation``, ``progress``, ``out``.

    A patch of the embedded text-to-image pipeline or VLM (``slug demo --target sd|vlm``) is audited on that model
    (:mod:`slugkit.audit.downstream`; ``audit_images``/``audit_gen_steps``, default 10/20, and ``attack`` for the
    text-to-image audit); options that audit does not read are refused. ``threads``: torch's CPU threads for the audit
    only; torch's random state is restored too.

    Raises ``TypeError`` / ``ValueError`` naming the argument before any model is loaded (a str for ``probes``, an
    unknown keyword, an ``out`` holding an audit without ``overwrite``), :class:`~slugkit.patch.PatchError` for a
    bad patch or a wrong base, ``ValueError`` when no data can be built or the patch names no concept."""
    from ..common.errors import check_device
    from ..patch import Patch, load_patch
    from .downstream import patch_kind

    unknown = sorted(set(kw) - set(_RUN_AUDIT_KW))
    if unknown:  # "run_audit() got an unexpected keyword argument", after the model had loaded (trial 29)
        raise TypeError(f"audit_patch: unknown keyword argument(s) {unknown}; it takes "
                        f"{', '.join(_RUN_AUDIT_KW)} besides its own")
    probes = kw.get("probes", PROBES)
    if not isinstance(probes, (list, tuple)) or not all(isinstance(x, str) for x in probes):  # None, a generator
        raise TypeError(f"audit_patch: probes must be a list of probe names such as {list(PROBES)[:2]}, got {probes!r}")
    if len(set(probes)) != len(probes):  # `slug audit --probes prompts,prompts` is refused; it ran from Python
        raise ValueError(f"audit_patch: probes: {next(p for p in probes if probes.count(p) > 1)!r} is given twice")
    bad = [x for x in probes if x not in PROBES]
    if bad or not probes:
        raise ValueError(f"audit_patch: unknown audit probe(s) {bad}; available: {', '.join(PROBES)}" if bad else
                         f"audit_patch: probes is empty; name at least one of {', '.join(PROBES)}")
    _check_types(kw, data, concept, pretrained, controls, aliases, audit_images, audit_gen_steps)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise (ValueError if isinstance(threads, int) and not isinstance(threads, bool) else TypeError)(
            f"audit_patch: threads must be an int >= 1 or None, got {threads!r}")
    if check_device(device):
        raise ValueError(f"audit_patch: device: {check_device(device)}")
    _check_out(kw.get("out"), overwrite)
    patch = patch_path if isinstance(patch_path, Patch) else load_patch(patch_path)
    label = "(a Patch object)" if isinstance(patch_path, Patch) else str(patch_path)
    kind = patch_kind(patch)
    given = {"thresholds": "thresholds" in kw, "attack": "attack" in kw, "relearn": "relearn" in kw,
             "gate_representation": kw.get("gate_representation", False), "data": data is not None,
             "controls": bool(controls), "aliases": bool(aliases), "pretrained": pretrained is not None,
             "device": device != "cpu", "audit_images": audit_images is not None,
             "audit_gen_steps": audit_gen_steps is not None, "model": model != "embedded",
             "family": family is not None}
    unread = [k for k, v in given.items() if v and k not in _READS[kind]]
    if unread:
        raise ValueError(f"audit_patch: {', '.join(unread)}: not read by the audit of a {kind} patch; leave "
                         f"{'them' if len(unread) > 1 else 'it'} out")
    before_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            if kind != "CLIP":
                return _audit_downstream(patch, label, kind, concept, probes, audit_images, audit_gen_steps, kw)
            return _audit_patch(patch, label, model, concept, pretrained, family, data, controls, aliases, device, kw)
    finally:
        torch.set_num_threads(before_threads)


def _check_types(kw: dict, data, concept, pretrained, controls, aliases, audit_images, audit_gen_steps) -> None:
    """``TypeError`` / ``ValueError`` naming the argument (trial 30: ``aliases="Gormere"`` became seven one-letter
    prompt variants, ``audit_images=0`` the default, an ``attack`` dict failed after the model had loaded)."""
    from .attack import AttackBudget
    from .base import AuditThresholds
    from .relearn import RelearnBudget

    from .data import AuditData

    if data is not None and not (isinstance(data, AuditData) or callable(data)):  # a folder path (trial 31)
        raise TypeError(f"audit_patch: data must be an AuditData or a callable (adapter, concept) -> AuditData "
                        f"(slugkit.audit.folder_audit_data builds one from folders), got {type(data).__name__}")
    for name, v in (("concept", concept), ("pretrained", pretrained)):
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise TypeError(f"audit_patch: {name} must be a non-empty str or None, got {v!r}")
    for name, v in (("controls", controls), ("aliases", aliases)):
        if v is not None and (isinstance(v, str) or not all(isinstance(x, str) and x.strip() for x in v)):
            raise TypeError(f"audit_patch: {name} must be a list of names, e.g. [{str(v)!r}], got {v!r}")
    for name, v in (("audit_images", audit_images), ("audit_gen_steps", audit_gen_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"audit_patch: {name} must be an int >= 1 (or None: the default), got {v!r}")
    for name, cls in (("attack", AttackBudget), ("relearn", RelearnBudget), ("thresholds", AuditThresholds)):
        if name in kw and not isinstance(kw[name], cls):
            raise TypeError(f"audit_patch: {name} must be a slugkit.audit.{cls.__name__}, got "
                            f"{type(kw[name]).__name__}")
    for name in ("gate_representation", "progress"):
        if name in kw and not isinstance(kw[name], bool):
            raise TypeError(f"audit_patch: {name} must be True or False, got {kw[name]!r}")


def _check_out(out, overwrite: bool) -> None:
    """The audit's folder: not empty, not a file, not inside a patch folder, no audit in it unless ``overwrite`` —
    each was found after the probes had run, or not at all (trial 30)."""
    from ..common.errors import check_flag

    check_flag("audit_patch: overwrite", overwrite)
    if out is None:
        return
    p = Path(out)
    if not str(out).strip():
        raise ValueError("audit_patch: out is empty; give a folder (or None: nothing written)")
    if p.exists() and not p.is_dir():
        raise ValueError(f"out (--out) {out}: a file is there; give a folder (created if missing)")
    from ..common.outputs import out_inside_model

    if out_inside_model(out, {}, "out"):  # the package's assets (trial 30)
        raise ValueError(f"audit_patch: {out_inside_model(out, {}, 'out')}")
    for d in (p, *p.resolve().parents):
        if (d / "patch.json").is_file() and (d / "patch.safetensors").is_file():
            raise ValueError(f"out (--out) {out} is inside the patch folder {d}; write the audit into the run "
                             "folder or elsewhere")  # named the function to a CLI user (trial 38)
    if not overwrite and any((p / n).exists() for n in (AUDIT_JSON, AUDIT_MD)):
        raise FileExistsError(f"{out} holds an audit ({AUDIT_JSON}); pass overwrite=True to replace it, or another out")


def _audit_downstream(patch, label, kind, concept, probes, audit_images, audit_gen_steps, kw) -> dict:
    from .downstream import audit_t2i_patch, audit_vlm_patch

    audited_concept(label, patch.meta.get("concept"), concept)  # another concept than the patch's is refused
    if kind == "VLM":
        return audit_vlm_patch(patch, label, kw.get("out"), probes=probes,
                               gate_representation=kw.get("gate_representation", False),
                               progress=kw.get("progress", True))
    return audit_t2i_patch(patch, label, kw.get("out"), probes=probes, attack=kw.get("attack"),
                           n_images=10 if audit_images is None else audit_images,
                           gen_steps=20 if audit_gen_steps is None else audit_gen_steps,
                           progress=kw.get("progress", True))


def _said_checkpoint(pretrained) -> str | None:
    """``pretrained`` as audit.json records it: a file as its absolute path (the folder an audit is read from is
    rarely the one it ran in), a tag as given, None for the model's own weights (the embedded CLIP's shipped ones)."""
    if pretrained is None:
        return None
    p = Path(pretrained).expanduser()
    return str(p.resolve()) if p.exists() else str(pretrained)


def _audit_patch(patch, label, model, concept, pretrained, family, data, controls, aliases, device, kw) -> dict:
    from ..models import load_adapter
    from .data import world_audit_data

    concept = audited_concept(label, patch.meta.get("concept"), concept)
    family = family or ("hf_clip" if patch.meta.get("adapter") == "hf_clip" else "open_clip")  # as `slug audit`
    if data is None and model != "embedded":
        raise ValueError("slug audit on a model other than the embedded one needs its data: --test-identities "
                         "and --names (and --train-identities for the relearning and representation probes)")
    before = load_adapter(model, pretrained, family, device=device)
    after = patched_copy(before, patch)
    if data is None:
        data = world_audit_data(before, concept, controls=controls, aliases=aliases)
    elif callable(data):
        data = data(before, concept)
    meta = {"patch": label, "model": model, "pretrained": _said_checkpoint(pretrained), "family": family,
            "method": patch.meta.get("method"), "layers": patch.names, **_verdict_fields(patch.meta)}
    return run_audit(before, after, data, meta=meta, **kw)
