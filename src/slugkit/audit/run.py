"""Run the audit probes on a patch and write ``audit.json`` / ``audit.md`` (and the audit section of ``report.md``).

:func:`run_audit` takes the unedited and the patched adapter (the same family; the patched one usually
:func:`patched_copy` of the other) and an :class:`~slugkit.audit.data.AuditData`;
:func:`slugkit.audit.patch_audit.audit_patch` loads them from a model id and a patch folder (the form ``slug audit``
takes). The result's ``status`` is the worst status of
the **gating** probes (the representation probe is reported but not gating unless asked; see
:mod:`slugkit.audit.representation`); a skipped probe says why and does not count.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.files import atomic_write_bytes, write_json
from ..common.outguard import record_entries
from ..common.progress import status as say
from .attack import AttackBudget, probe_attack
from .base import PROBES, AuditThresholds, overall
from .data import AuditData
from .precision import probe_precision
from .prompts import probe_prompts
from .relearn import RelearnBudget, clone_adapter, probe_relearn
from .representation import probe_representation

AUDIT_JSON, AUDIT_MD = "audit.json", "audit.md"
REPORT_BEGIN, REPORT_END = "<!-- slug audit: begin -->", "<!-- slug audit: end -->"
BANNER = "<!-- slug audit: banner -->"  # the line under report.md's title that says the audit's status


def patched_copy(adapter, patch):
    """A copy of ``adapter`` (own model) with ``patch`` applied (hash-checked: a wrong base raises
    :class:`~slugkit.patch.PatchMismatchError`)."""
    from ..patch import apply_patch

    a = clone_adapter(adapter)
    apply_patch(a.model, patch)
    return a


def run_audit(before, after, data: AuditData, *, probes=PROBES, thresholds: AuditThresholds = AuditThresholds(),
              attack: AttackBudget = AttackBudget(), relearn: RelearnBudget = RelearnBudget(),
              gate_representation: bool = False, progress: bool = True, out: str | Path | None = None,
              meta: dict | None = None) -> dict:
    """Run ``probes`` (names from :data:`PROBES`) and return the audit record; with ``out``, write it there
    (:func:`write_audit`). Raises ``ValueError`` for an unknown probe name."""
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown audit probe(s) {unknown}; available: {', '.join(PROBES)}")
    t0 = time.perf_counter()
    records = []
    for name in PROBES:
        if name not in probes:
            continue
        say(f"audit: {name} ...", progress)
        torch.manual_seed(0)
        if name == "prompts":
            rec = probe_prompts(before, after, data, thresholds)
        elif name == "attack":
            rec = probe_attack(before, after, data, thresholds, attack)
        elif name == "precision":
            rec = probe_precision(before, after, data, thresholds)
        elif name == "relearn":
            rec = probe_relearn(before, after, data, thresholds, relearn)
        else:
            rec = probe_representation(before, after, data, thresholds, gating=gate_representation)
        say(f"audit: {name}: {rec['status']} ({rec.get('seconds', 0.0):.0f} s)", progress)
        records.append(rec)
    result = {"audit_version": 1, "concept": data.concept, "controls": data.controls, "data": data.source,
              **(meta or {}), **overall(records),
              "probes": records, "not_run": [p for p in PROBES if p not in probes], "thresholds": thresholds.as_dict(),
              "budgets": {"attack": asdict(attack), "relearn": asdict(relearn)},
              "seconds": time.perf_counter() - t0}
    if out is not None:
        write_audit(result, out)
    return result


def audited_concept(patch_path, removed, concept: str | None) -> str:
    """The concept to audit: ``concept`` (``--concept``) when the patch removed it (case and outer spaces aside), else
    the one the patch removed (``removed``: its ``concept``, a name or a list). Raises ``ValueError`` for a concept
    the patch did not remove (auditing it says nothing about the patch), or none given for a several-concept patch."""
    from ..patch.combine import said

    removed_list = removed if isinstance(removed, list) else [removed] if removed else []
    concept = concept or (removed if isinstance(removed, str) else None)
    if not concept:
        raise ValueError(f"{patch_path}: the patch removed {said(removed)}; pass --concept NAME (one of them: each "
                         "concept is audited on its own, so give each audit its own --out)")
    if removed_list and concept.strip().lower() not in {str(c).strip().lower() for c in removed_list}:
        from ..common.text import did_you_mean

        # "omit --concept" was advised for a several-concept patch, which then refused that (trial 48)
        what = ("name one the patch removed" if len(removed_list) > 1 else
                "omit --concept, or name the one the patch removed")
        raise ValueError(f"--concept {concept!r}: the patch at {patch_path} removed {said(removed)}; auditing another "
                         f"concept says nothing about it ({did_you_mean(concept.strip(), removed_list)}{what})")
    return concept


def _run_verdict(patch: str | None) -> dict:
    """``{"patch_run_verdict": extra.verdict, "patch_run_why": why it failed / what it warned of}`` of the run that
    made the patch at
    ``patch`` (its ``patch.json``; the verdict None when unknown): the saved audit of a failed run's patch read as a
    plain pass (tenth trial)."""
    import json

    from ..patch.format import resolve_patch_dir

    try:
        doc = json.loads((resolve_patch_dir(patch) / "patch.json").read_text(encoding="utf-8")) if patch else {}
    except (OSError, ValueError):
        return {"patch_run_verdict": None}
    return _verdict_fields(doc)


def _verdict_fields(doc) -> dict:
    """:func:`_run_verdict`'s fields from a patch's metadata (``patch.json``'s content)."""
    extra = doc.get("extra") if isinstance(doc, dict) else None
    if not isinstance(extra, dict):
        return {"patch_run_verdict": None}
    from ..patch.summary import failed_because, warned_of

    return {"patch_run_verdict": extra.get("verdict"),
            **({"patch_run_why": failed_because(extra)} if extra.get("verdict") == "fail" else
               {"patch_run_why": warned_of(extra)} if extra.get("verdict") == "warn" and warned_of(extra) else {})}


def _with_banner(text: str, result: dict) -> str:
    """``report.md`` with one line under its first line (the title, or a downstream run's verdict banner) saying the
    audit's status: the audit section sits at the end, and a failed audit left a head that read pass (trial 44)."""
    lines = text.split("\n")
    for i in [i for i, ln in enumerate(lines) if ln.endswith(BANNER)][::-1]:  # an earlier audit's, with its gap
        del lines[i - 1 if i > 0 and not lines[i - 1] else i:i + 1]
    status = result.get("status", "?")
    ran = ", ".join(r["probe"] for r in result.get("probes", []) if r.get("gating", True)) or "none"
    what = {"pass": "the removal held", "warn": "the removal may not hold",
            "fail": "the removal does not hold"}.get(status, "see the section")
    line = (f"> **Audit: {status}** — {what} (gating probes run: {ran}; section \"Audit\" at the end; audit.md). "
            f"{BANNER}")
    return "\n".join(lines[:1] + ["", line] + lines[1:]) if lines else text


def write_audit(result: dict, out: str | Path) -> None:
    """``audit.json`` and ``audit.md`` in ``out`` (created if missing), each written atomically; if ``out`` holds a
    ``report.md`` (a run folder), its audit section is replaced (or appended) with the same markdown."""
    from .report import audit_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "patch_run_verdict" not in result:
        result.update(_run_verdict(result.get("patch")))
    md = audit_markdown(result)
    write_json(out / AUDIT_JSON, result)
    atomic_write_bytes(out / AUDIT_MD, md.encode())
    record_entries(out, [AUDIT_JSON, AUDIT_MD])  # a run folder's: replaced with the run, not kept as the user's
    report = out / "report.md"
    if report.is_file():
        text = report.read_text()
        section = f"{REPORT_BEGIN}\n{md}{REPORT_END}\n"
        if REPORT_BEGIN in text and REPORT_END in text:
            head, rest = text.split(REPORT_BEGIN, 1)
            text = head + section + rest.split(REPORT_END, 1)[1].lstrip("\n")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        atomic_write_bytes(report, _with_banner(text, result).encode())
        record_entries(out, ["report.md"])  # slug's own change: not a user's edit (outguard.edited_entries)
