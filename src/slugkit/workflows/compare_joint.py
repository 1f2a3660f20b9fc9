"""Every method of ``slug compare`` once on one forget set: a single concept, or several concepts jointly.

The forget and retain pairs, the validation and test suites and the MIA are loaded once (:class:`_Inputs`); then
each method starts from the pristine weights (:func:`~slugkit.workflows.compare_support.start_method`) and gets its
entry: SLUG from :func:`~slugkit.workflows.unlearn.run_unlearn` on the shared model (its stages replayed for memory
and CPU), a baseline from its own run with per-epoch validation. With several concepts (``mode`` ``joint``) the
forget set holds every concept (100 pairs each on the embedded world), the retain set names none of them, and one
validation criterion covers all the concepts' images (each scored against its own name).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .compare_support import (PEAK_MEM_NOTE, Base, PeakRSS, changed_storage, evaluator, make_baseline, mia_heldout,
                              mia_runner, peak_mem_method, per_concept, record_cuda_peak, slug_cost, slug_passes,
                              slug_replay, start_method)


@dataclass
class _Inputs:
    """The inputs of a joint comparison, loaded once and shared by every method."""

    f_img: torch.Tensor
    f_tok: torch.Tensor
    r_img: torch.Tensor
    r_tok: torch.Tensor
    val_suite: object
    val_eval: object
    test_suite: object
    test_eval: object
    before: dict  # test metrics of the base weights
    val_before: dict  # validation metrics of the base weights
    heldout: tuple | None  # the MIA's non-member pairs
    run_mia: Callable
    mia_before: dict | None
    data: object  # the baselines' MethodData
    extra: dict = field(default_factory=dict)  # built on first use (the audit's data)


def compare_joint(cc, cfg, cur, data_dir, adapter, base: Base, out: Path, concepts: list[str],
                  cache: dict | None) -> dict:
    """Every method once on one forget set (one concept, or several jointly); returns the report (not written)."""
    j = _load_inputs(cc, cfg, adapter, concepts, cache)
    entries = {}
    for name in cc.methods:
        entry = start_method(cc, base, name)
        if name == "slug":
            entry.update(_slug_joint(cc, cfg, adapter, base, out, j))
        else:
            entry.update(_baseline_joint(cc, name, adapter, base, j))
        record_cuda_peak(entry)
        pc = per_concept(entry["metrics"]["before"], entry["metrics"]["after"])
        if pc:
            entry["per_concept"] = pc
        if cc.audit is not None and len(concepts) == 1:
            entry["audit"] = _audit_method(cc, cfg, adapter, base, out, name, concepts[0], j)
        entries[name] = entry
    base.restore("after the comparison")
    return _joint_report(cfg, cur, data_dir, adapter, base, concepts, j, entries)


def _load_inputs(cc, cfg, adapter, concepts: list[str], cache: dict | None) -> _Inputs:
    """The forget and retain pairs, the validation and test suites with their base metrics, the MIA and its value on
    the base weights, the baselines' data."""
    from ..methods import MethodData
    from .inputs import load_pairs

    f_img, f_tok, _ = load_pairs(adapter, cfg.forget, cfg.forget_samples, cfg.strict, "forget")
    r_img, r_tok, _ = load_pairs(adapter, cfg.retain, cfg.retain_samples, cfg.strict, "retain")
    val_suite, val_eval = evaluator(adapter, cfg, cfg.val_identities, cfg.utility_val, cache)
    test_suite, test_eval = evaluator(adapter, cfg, cfg.test_identities, cfg.utility_test, cache)
    before, val_before = test_eval.base_metrics(), val_eval.base_metrics()
    heldout = mia_heldout(cc, adapter, cfg, concepts)
    run_mia = mia_runner(adapter, (f_img, f_tok), heldout)
    mia_before = run_mia()
    data = MethodData(f_img, f_tok, r_img, r_tok, batch_size=cc.batch_size, seed=cc.seed)
    return _Inputs(f_img, f_tok, r_img, r_tok, val_suite, val_eval, test_suite, test_eval, before, val_before,
                   heldout, run_mia, mia_before, data)


def _slug_joint(cc, cfg, adapter, base: Base, out: Path, j: _Inputs) -> dict:
    """SLUG's entry: :func:`run_unlearn` on the shared adapter, its stages replayed for memory and CPU, the patch
    applied for the changed-parameter count and the MIA, then reverted."""
    from ..patch import apply_patch, load_patch, revert_patch
    from .unlearn import run_unlearn

    scfg = replace(cfg, out=str(out / "slug"), progress=False, overwrite=cc.overwrite)
    result = run_unlearn(scfg, adapter=adapter)
    t = result["timing_s"]
    time_s, cpu_s = slug_cost(result)
    entry = {
        "metrics": result["metrics"],
        "verdict": result["verdict"],
        "time_s": time_s, "cpu_s": cpu_s,
        "timing_s": {"precompute": t["gradients"] + t["layers"] + t.get("neighbours", 0.0), "search": t["search"],
                     "run_unlearn": t},
        "peak_mem_bytes": slug_replay(adapter, cfg, j.f_img, j.f_tok, j.r_img, j.r_tok, j.val_eval, j.val_before)[0],
        "storage_bytes": result["patch"]["bytes"],
        "passes": slug_passes(result),
        "epochs": [{"epoch": i + 1, "layer": e["layer"], "step_size": e["step_size"], "val": e["metrics"],
                    "accepted": e["accepted"]} for i, e in enumerate(result["search"])],
        "selected_epoch": None, "layer": result["layer"], "step_size": result["step_size"],
        "layers": [e["layer"] for e in result.get("layers_edited") or []] or [result["layer"]],
        "config": result["config"], "result": "slug/result.json",
    }
    base.check_unchanged("run_unlearn")
    patch = load_patch(out / "slug" / "patch")
    apply_patch(adapter.model, patch)
    entry["changed_params"] = changed_storage(adapter.model, base.state)["changed_params"]
    entry["mia"] = j.run_mia()
    revert_patch(adapter.model, patch)
    return entry


def _baseline_joint(cc, name: str, adapter, base: Base, j: _Inputs) -> dict:
    """A baseline's entry: the method run (timed, memory sampled) with per-epoch validation, then the selected
    weights tested and attacked (MIA)."""
    method = make_baseline(cc, name)
    with PeakRSS() as pm:
        t0, c0 = time.perf_counter(), time.process_time()
        res = method.run(adapter, j.data, j.val_eval)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    sel = next((e for e in res.epochs if e["epoch"] == res.selected_epoch), None)
    after = j.test_eval.evaluate_naive()
    entry = {
        "metrics": {"before": j.before, "after": after, "validation_before": j.val_before,
                    "validation_after": sel["val"] if sel else None},
        "time_s": elapsed, "cpu_s": cpu, "timing_s": res.timing_s, "peak_mem_bytes": pm.bytes,
        **changed_storage(adapter.model, base.state),
        "passes": res.passes.as_dict(), "epochs": res.epochs, "selected_epoch": res.selected_epoch,
        "config": res.config, "info": res.info,
    }
    entry["mia"] = j.run_mia()
    return entry


def _audit_method(cc, cfg, adapter, base: Base, out: Path, name: str, concept: str, j: _Inputs) -> dict:
    """``slug compare --audit``: the audit probes (:mod:`slugkit.audit`) on method ``name``'s result — the weights
    the adapter holds after a baseline, SLUG's patch applied to a copy — against the base weights; the full record
    in ``out/audit/<name>/audit.json`` / ``audit.md``; returns the summary kept in ``compare.json``."""
    from ..audit import folder_audit_data, patched_copy, run_audit, world_audit_data
    from ..audit.relearn import clone_adapter
    from ..audit.report import TITLES
    from ..audit.data import name_list
    from ..patch import load_patch

    before = clone_adapter(adapter)
    before.model.load_state_dict(base.state)
    after = patched_copy(before, load_patch(out / "slug" / "patch")) if name == "slug" else clone_adapter(adapter)
    if "audit_data" not in j.extra:
        if cc.unlearn is None:
            j.extra["audit_data"] = world_audit_data(before, concept)
        else:
            j.extra["audit_data"] = folder_audit_data(before, concept, name_list(cfg.names, cfg.test_identities),
                                                      cfg.identity_templates, cfg.test_identities)
    res = run_audit(before, after, j.extra["audit_data"], out=out / "audit" / name,
                    meta={"method": name, "model": cfg.model}, **{**cc.audit, "progress": cc.progress})
    return {"status": res["status"], "file": f"audit/{name}/audit.json", "seconds": res["seconds"],
            "probes": {r["probe"]: {k: r.get(k) for k in ("status", "graded", "summary", "gating")}
                       | {"title": TITLES[r["probe"]]} | _calibration(r) for r in res["probes"]}}


def _calibration(rec: dict) -> dict:
    """The control numbers that sit next to an attack or relearning result in ``compare.md``."""
    if rec["probe"] == "attack" and rec.get("concept"):
        ctl = rec.get("control") or {}
        return {"concept_iterations": rec["concept"].get("iterations_to_level"),
                "control_iterations": ctl.get("iterations_to_level"), "concept_success": rec["concept"]["success"],
                "control_success": ctl.get("success")}
    if rec["probe"] == "relearn" and rec.get("rows"):
        r = max(rec["rows"], key=lambda x: x["speedup"])
        return {"n": r["n"], "concept_steps": r["concept_steps"], "control_steps": r.get("control_steps")}
    return {}


def _joint_report(cfg, cur, data_dir, adapter, base: Base, concepts: list[str], j: _Inputs, entries: dict) -> dict:
    """The joint (or single-concept) report (not written): the base, the data sizes and the methods' entries, each
    with its worst-case collateral (:func:`slugkit.workflows.records.collateral_of`: every other identity, the worst,
    the nearest neighbours)."""
    from ..eval.collateral import NEIGHBOURS_K, nearest_concepts
    from .records import collateral_of

    near = nearest_concepts(j.val_eval.class_embeddings(), j.val_suite.names, j.val_suite.target_list(), NEIGHBOURS_K)
    for e in entries.values():
        e["collateral"] = collateral_of(j.before, e["metrics"]["after"], near)
    return {
        "concept": cfg.concept, "concepts": concepts, "mode": "joint" if len(concepts) > 1 else "single",
        "model": adapter.model_id, "base_sha256": base.sha256,
        "original": {"metrics": {"before": j.before, "validation_before": j.val_before}, "mia": j.mia_before},
        "data": {"n_forget": int(j.f_img.shape[0]), "n_retain": int(j.r_img.shape[0]),
                 "val_sizes": j.val_suite.sizes(), "test_sizes": j.test_suite.sizes(),
                 "mia_heldout": int(j.heldout[0].shape[0]) if j.heldout is not None else 0,
                 "world_data": str(data_dir), "curate": cur},
        "peak_mem_method": peak_mem_method(), "peak_mem_note": PEAK_MEM_NOTE,
        "methods": entries,
    }
