"""``slug audit``: does a removal hold? Probes that try to bring the forgotten concept back.

Each probe (one module each) measures recognition of the concept on the unedited and on the patched model under one
kind of pressure and grades it (:mod:`slugkit.audit.base`): prompt variants (:mod:`.prompts`), an adversarial
prompt search with a never-learned control concept (:mod:`.attack`), reduced precision (:mod:`.precision`),
relearning by fine-tuning, again against a control (:mod:`.relearn`), and a linear probe on the image features
(:mod:`.representation`). :func:`run_audit` runs them and writes ``audit.json`` / ``audit.md``;
:func:`audit_patch` (``slug audit``) loads the model and the patch and runs the audit that fits the patch (a CLIP's,
or the embedded text-to-image pipeline's or VLM's: :mod:`.downstream`).
"""

from __future__ import annotations

import importlib

_WHERE = {"AttackBudget": "attack", "AuditThresholds": "base", "PROBES": "base", "AuditData": "data",
          "folder_audit_data": "data", "world_audit_data": "data", "RelearnBudget": "relearn",
          "audit_patch": "patch_audit",
          "patched_copy": "run", "run_audit": "run", "write_audit": "run", "patch_kind": "downstream",
          "audit_t2i_patch": "downstream", "audit_vlm_patch": "downstream"}


def __getattr__(name):
    """Lazy names (PEP 562): building the CLI's parser reads ``PROBES`` without importing torch."""
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    """The lazy names too (``help(slugkit.audit)`` listed none of them: trial 29)."""
    return sorted(set(globals()) | set(__all__))


__all__ = ["AttackBudget", "AuditData", "AuditThresholds", "PROBES", "RelearnBudget", "audit_patch",
           "audit_t2i_patch", "audit_vlm_patch", "folder_audit_data", "patch_kind", "patched_copy", "run_audit",
           "world_audit_data", "write_audit"]
