"""An audit run as part of a run (``slug demo`` / ``slug unlearn`` ``--audit``, every target) folded into that run's
verdict. The audit ran after the run folder was written, and its outcome reached the exit status and the audit
section alone: a run whose audit failed (the first name alone still named her; an adversarial prompt brought her back)
kept ``verdict: pass`` in the terminal, ``result.json``, the head of ``report.md`` and the patch's ``extra.verdict``
— so ``slug inspect`` and ``slug apply`` of the patch said pass (trial 44). Here:

* ``result.json``: ``audit`` (status, each probe's status) and, for an audit that warns or fails, a verdict reason
  ``audit_warn`` / ``audit_fail`` of that severity (the status is recomputed: the most severe reason);
* the head of ``report.md``: its verdict block (or the downstream banner's status) rewritten from that verdict;
* ``patch.json``: ``extra``'s verdict fields and ``extra.audit`` (only ``patch.json`` changes; the tensors and their
  hashes stay, the fingerprint follows the metadata as for any verdict mark).

A standalone ``slug audit`` leaves the run's verdict and its patch as they were (a patch may have been handed on, or
built on by a sequential run's next step); its outcome is in ``audit.json`` / ``audit.md``, the report's audit
section and the status line under its title; into a run whose verdict took in an audit it is refused
(:func:`slugkit.cli.audit.cmd_audit`: that evidence is kept).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SEVERITY = {"pass": 0, "warn": 1, "fail": 2}


def audit_reason(audit: dict) -> dict | None:
    """The verdict reason for ``audit`` (``audit.json``'s content), or None when it passed."""
    from ..audit.report import TITLES

    status = audit.get("status")
    if status == "unfinished":  # recorded before the audit runs; its outcome replaces it (a Ctrl-C leaves it)
        return {"code": "audit_unfinished", "severity": "warn",
                "message": "the audit asked with --audit did not finish (interrupted?): the removal was not audited; "
                           "run slug audit --patch RUN --out DIR"}
    if status not in ("warn", "fail"):
        return None
    probes = [r for r in audit.get("probes", []) if r.get("gating", True) and r.get("status") in ("warn", "fail")]
    said = ", ".join(f"{TITLES.get(r['probe'], r['probe'])} {r['status']}" for r in probes) or "see audit.md"
    what = "does not hold" if status == "fail" else "may not hold"
    return {"code": f"audit_{status}", "severity": status,
            "message": f"the audit run with this run says the removal {what}: {said} (audit.md)"}


def fold_audit(out: str | Path, audit: dict) -> dict | None:
    """Fold ``audit`` into the run folder ``out`` (module docstring). Returns the new verdict, None when ``out``
    holds no run (no ``result.json``)."""
    from ..common.files import atomic_write_bytes, write_json
    from ..report.unlearn import verdict_lines

    out = Path(out)
    if not (out / "result.json").is_file():
        return None
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    verdict = dict(result.get("verdict") or {"status": "pass", "reasons": [], "budgets": {}})
    reasons = [r for r in verdict.get("reasons", []) if not str(r.get("code", "")).startswith("audit_")]
    reason = audit_reason(audit)
    if reason:
        reasons.append(reason)
    verdict["reasons"] = reasons
    verdict["status"] = max((r["severity"] for r in reasons), key=SEVERITY.get, default="pass")
    result["verdict"] = verdict
    result["audit"] = {"status": audit.get("status"), "file": "audit.json",
                       "probes": {r["probe"]: r["status"] for r in audit.get("probes", [])}}
    write_json(out / "result.json", result)
    report = out / "report.md"
    if report.is_file():
        atomic_write_bytes(report, _report_head(report.read_text(encoding="utf-8"), verdict,
                                                verdict_lines).encode("utf-8"))
    if (out / "patch" / "patch.json").is_file():
        _mark(out / "patch", verdict, audit.get("status"))
    from ..common.outguard import record_entries

    record_entries(out, ["result.json", "report.md", "patch"])  # slug's own change: not a user's edit
    return verdict


def _mark(folder: Path, verdict: dict, status: str | None) -> None:
    """``patch.json``'s ``extra`` verdict fields and ``extra.audit``; written by the patch format's own writer (the
    run folder is finished: :func:`slugkit.patch.save_patch` refuses a run's patch, for a user's call)."""
    from ..patch import load_patch
    from ..patch.format import save_patch as write
    from .verdict import verdict_fields

    patch = load_patch(folder)
    extra = {**(patch.meta.get("extra") or {}), **verdict_fields(verdict), "audit": status}
    if extra != patch.meta.get("extra"):
        patch.meta["extra"] = extra
        write(patch, folder, overwrite=True)


def _report_head(text: str, verdict: dict, verdict_lines) -> str:
    """``report.md`` with its first verdict block (``**verdict: X**`` and the ``- `` lines under it) rewritten, or,
    for a downstream run, its banner's status ("This run's verdict, judged on …: X**") and the ``> - `` reason lines
    under it (:func:`slugkit.report.unlearn.downstream_reason_lines`); a banner of an earlier version ("This run's
    verdict is the …: X**", no reason lines) gets the audit's reason beside its status."""
    banner = re.search(r"(> \*\*This run's verdict[^:*]*: )(\w+)(\*\*)", text)
    if banner:
        from ..report.unlearn import downstream_reason_lines

        end = text.find("\n", banner.end(3))
        end = len(text) if end < 0 else end + 1
        rest = text[end:]
        old = re.match(r"(> - [^\n]*\n)+", rest)
        judged = re.match(r"This run's verdict, judged on ([^:*]*): ", banner.group(1)[4:])
        if judged:  # this version's banner: its reason lines rewritten (a pass had none)
            new = "".join(f"> {line}\n" for line in downstream_reason_lines(verdict, judged.group(1)))
            return (text[:banner.start(2)] + verdict["status"] + text[banner.end(2):end] + new
                    + (rest[old.end():] if old else rest))
        said = next((f" ({r['message']})" for r in verdict["reasons"] if r["code"].startswith("audit_")), "")
        return text[:banner.start(2)] + verdict["status"] + "**" + said + text[banner.end(3):]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("**verdict: "):
            j = i + 1
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            new = [f"**{x}**" if k == 0 else f"- {x}" for k, x in enumerate(verdict_lines(verdict))]
            return "\n".join(lines[:i] + new + lines[j:])
    return text


def pending(out) -> None:
    """Before an audit run with its run (``--audit``): the run's verdict records it as unfinished
    (``audit_unfinished``, warn), replaced by the audit's own outcome when it ends — a Ctrl-C during the audit left a
    run reading "pass" with no trace of the audit it asked for (verify 47)."""
    fold_audit(out, {"status": "unfinished", "probes": []})


def run_took_in_audit(out: Path) -> bool:
    """``out`` is a run folder whose verdict took in the audit run with it (``result.json → audit``; verify 45)."""
    try:
        return isinstance(json.loads((Path(out) / "result.json").read_text(encoding="utf-8")).get("audit"), dict)
    except (OSError, ValueError, AttributeError):
        return False
