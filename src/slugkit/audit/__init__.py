"""``slug audit``: does a removal hold? Probes that try to bring the forgotten concept back.

Each probe (one module each) measures recognition of the concept on the unedited and on the patched model under one
kind of pressure and grades it (:mod:`slugkit.audit.base`): prompt variants (:mod:`.prompts`), an adversarial
prompt search with a never-learned control concept (:mod:`.attack`), reduced precision (:mod:`.precision`),
relearning by fine-tuning, again against a control (:mod:`.relearn`), and a linear probe on the image features
(:mod:`.representation`). :func:`run_audit` runs them and writes ``audit.json`` / ``audit.md``.
"""

from .attack import AttackBudget
from .base import AuditThresholds
from .data import AuditData, folder_audit_data, world_audit_data
from .relearn import RelearnBudget
from .run import PROBES, audit_patch, patched_copy, run_audit, write_audit

__all__ = ["AttackBudget", "AuditData", "AuditThresholds", "PROBES", "RelearnBudget", "audit_patch",
           "folder_audit_data", "patched_copy", "run_audit", "world_audit_data", "write_audit"]
