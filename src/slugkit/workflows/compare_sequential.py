"""``slug compare --concepts A,B,... --modes sequential``: the concepts unlearned one after another.

Each step has its own forget and retain sets (curated for that concept, the retain pairs that name an earlier concept
removed) and is validated on its own concept. SLUG runs :func:`slugkit.unlearn.run_sequential` (one run per concept
on the already patched model; the patches folded with :func:`slugkit.patch.chain_patches` into
``out/sequential/slug/patch``); every baseline runs step k from the weights step k−1 left (a fresh optimizer per
step). Time, passes and storage are summed / taken over all steps; peak memory is the largest step's. Every method is
tested on the same test images as the joint mode: each concept's FA@1/FA@5 (``per_concept``), the shared utility and
related accuracy. Sequential mode needs the embedded world (one forget set per concept).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .compare_support import (PEAK_MEM_NOTE, PeakRSS, add_passes, changed_storage, evaluator, make_baseline,
                              mia_heldout, mia_runner, peak_mem_method, per_concept, record_cuda_peak, slug_cost,
                              slug_passes, slug_replay, start_method)


@dataclass
class _Steps:
    """The inputs of a sequential comparison, loaded once and shared by every method."""

    steps: list[tuple]  # (UnlearnConfig, curation info, world data folder) per concept
    joint: object  # the configuration naming every concept (the test suite's)
    test_suite: object
    test_eval: object
    before: dict  # test metrics of the base weights
    pairs: list[tuple]  # (forget images, forget tokens, retain images, retain tokens) per step
    val_suites: tuple
    val_evals: tuple
    heldout: tuple | None  # the MIA's non-member pairs
    run_mia: Callable
    mia_before: dict | None

    @property
    def cfgs(self) -> list:
        """Each step's ``UnlearnConfig``."""
        return [s[0] for s in self.steps]


def compare_sequential(cc, concepts: list[str], adapter, base, out: Path, cache: dict | None) -> dict:
    """Every method over the concepts one after another (see the module docstring); returns the report."""
    from ..eval.collateral import NEIGHBOURS_K, nearest_concepts
    from .records import collateral_of

    s = _load_steps(cc, concepts, adapter, out, cache)
    suite = s.val_suites[-1]  # the last step's suite names every concept unlearned
    near = nearest_concepts(s.val_evals[-1].class_embeddings(), suite.names,
                            [suite.names.index(c) for c in concepts if c in suite.names], NEIGHBOURS_K)
    entries = {}
    for name in cc.methods:
        entry = start_method(cc, base, name, "sequential ")
        if name == "slug":
            entry.update(_slug_sequential(cc, adapter, base, out, s))
        else:
            entry.update(_baseline_sequential(cc, name, adapter, base, s))
        entry["per_concept"] = per_concept(s.before, entry["metrics"]["after"])
        entry["collateral"] = collateral_of(s.before, entry["metrics"]["after"], near)
        record_cuda_peak(entry)
        entries[name] = entry
    base.restore("after the sequential comparison")
    return _sequential_report(concepts, adapter, base, s, entries)


def _sequential_configs(cc, concepts: list[str], out: Path) -> list[tuple]:
    """One ``UnlearnConfig`` per step, as ``slug demo --sequential`` builds them
    (:func:`slugkit.world.demo_data.sequential_world_configs`: each step's retain set drops the pairs naming an
    earlier concept — with them, a baseline's retain pass would teach an already forgotten concept again)."""
    from .world_runs import sequential_world_configs

    steps = sequential_world_configs(
        concepts, lambda k, c: out / "slug" / f"{k + 1}-{c.replace(' ', '_')}", cc.data_dir, progress=cc.progress,
        seed=cc.seed, threads=cc.threads, overwrite=cc.overwrite, forget_samples=cc.forget_samples,
        retain_samples=cc.retain_samples, retain_identity_fraction=cc.retain_identity_fraction, device=cc.device)
    return [(replace(cfg, progress=False), cur, data) for cfg, cur, data in steps]


def _load_steps(cc, concepts: list[str], adapter, out: Path, cache: dict | None) -> _Steps:
    """The step configurations, the test suite over every concept, each step's pairs and validation suite, the MIA
    (forget pairs of every step vs the held-out pairs) and its value on the base weights."""
    from .inputs import load_pairs

    steps = _sequential_configs(cc, concepts, out)
    cfgs = [s[0] for s in steps]
    joint = replace(cfgs[0], concepts=list(concepts), concept=" + ".join(concepts))
    test_suite, test_eval = evaluator(adapter, joint, joint.test_identities, joint.utility_test, cache)
    before = test_eval.base_metrics()
    pairs = [load_pairs(adapter, c.forget, c.forget_samples, c.strict, "forget")[:2] +
             load_pairs(adapter, c.retain, c.retain_samples, c.strict, "retain")[:2] for c in cfgs]
    val_suites, val_evals = zip(*[evaluator(adapter, c, c.val_identities, c.utility_val, cache) for c in cfgs])
    heldout = mia_heldout(cc, adapter, joint, concepts)
    run_mia = mia_runner(adapter, (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])), heldout)
    mia_before = run_mia()
    return _Steps(steps, joint, test_suite, test_eval, before, pairs, val_suites, val_evals, heldout, run_mia,
                  mia_before)


def _slug_sequential(cc, adapter, base, out: Path, s: _Steps) -> dict:
    """SLUG's entry: :func:`run_sequential` on the shared adapter, each step's stages replayed for memory and CPU,
    the chained patch tested and attacked (MIA), then reverted."""
    from ..patch import apply_patch, load_patch, revert_patch
    from .sequential import run_sequential

    cfgs = s.cfgs
    result = run_sequential(cfgs, out / "slug", adapter=adapter, overwrite=cc.overwrite)
    base.check_unchanged("run_sequential")
    step_results = [json.loads((Path(c.out) / "result.json").read_text()) for c in cfgs]
    peak = _replay_steps(adapter, s)
    chained = load_patch(out / "slug" / "patch")
    apply_patch(adapter.model, chained)
    after = s.test_eval.evaluate_naive()
    entry = {
        "metrics": {"before": s.before, "after": after},
        "verdict": result["verdict"],
        "time_s": sum(slug_cost(r)[0] for r in step_results),  # the neighbour projection was left out
        "cpu_s": sum(slug_cost(r)[1] for r in step_results),
        "timing_s": {"per_step": [r["timing_s"] for r in step_results],
                     "run_sequential_total": result["timing_s"]["total"]},
        "peak_mem_bytes": peak, "storage_bytes": result["patch"]["bytes"],
        "changed_params": changed_storage(adapter.model, base.state)["changed_params"],
        "passes": _slug_seq_passes(step_results),
        "steps": [{"concept": c.concept, "layer": r["layer"], "step_size": r["step_size"],
                   "layers": [e["layer"] for e in r.get("layers_edited") or []] or [r["layer"]],
                   "time_s": slug_cost(r)[0],
                   "validation_after": r["metrics"]["validation_after"],
                   "result": str(Path(c.out).relative_to(out) / "result.json")}
                  for c, r in zip(cfgs, step_results)],
        "epochs": [], "selected_epoch": None, "result": "slug/result.json",
    }
    entry["mia"] = s.run_mia()
    revert_patch(adapter.model, chained)
    return entry


def _replay_steps(adapter, s: _Steps) -> int:
    """SLUG's peak memory (the largest step's): each step's round-1 stages replayed on the model carrying the
    earlier steps' patches, which are reverted afterwards."""
    from ..eval.zeroshot import SuiteEvaluator
    from ..patch import apply_patch, load_patch, revert_patch

    patches, peak = [load_patch(Path(c.out) / "patch") for c in s.cfgs], 0
    for k, (c, (fi, ft, ri, rt)) in enumerate(zip(s.cfgs, s.pairs)):
        if k:
            apply_patch(adapter.model, patches[k - 1])
        ve = SuiteEvaluator(adapter, s.val_suites[k], c.eval_batch_size)
        peak = max(peak, slug_replay(adapter, c, fi, ft, ri, rt, ve, ve.base_metrics())[0])
    for p in reversed(patches[:-1]):
        revert_patch(adapter.model, p)
    return peak


def _slug_seq_passes(step_results: list[dict]) -> dict:
    total = {}
    for r in step_results:
        add_passes(total, slug_passes(r))
    return total


def _baseline_sequential(cc, name: str, adapter, base, s: _Steps) -> dict:
    """A baseline's entry: step k run from the weights step k−1 left (a fresh method and optimizer per step), then
    the final weights tested and attacked (MIA)."""
    from ..methods import MethodData

    total, cpu, timing, passes, peak, step_info = 0.0, 0.0, {}, {}, 0, []
    for k, (c, (fi, ft, ri, rt)) in enumerate(zip(s.cfgs, s.pairs)):
        method = make_baseline(cc, name)
        data = MethodData(fi, ft, ri, rt, batch_size=cc.batch_size, seed=cc.seed)
        with PeakRSS() as pm:
            t0, c0 = time.perf_counter(), time.process_time()
            res = method.run(adapter, data, s.val_evals[k])
            elapsed = time.perf_counter() - t0
        total, cpu = total + elapsed, cpu + time.process_time() - c0
        peak = max(peak, pm.bytes)
        for key, v in res.timing_s.items():
            timing[key] = timing.get(key, 0.0) + v
        add_passes(passes, res.passes.as_dict())
        sel = next((e for e in res.epochs if e["epoch"] == res.selected_epoch), None)
        step_info.append({"concept": c.concept, "time_s": elapsed, "epochs": res.epochs,
                          "selected_epoch": res.selected_epoch, "epochs_run": len(res.epochs),
                          "validation_after": sel["val"] if sel else None, "config": res.config,
                          "info": res.info})
    after = s.test_eval.evaluate_naive()
    entry = {
        "metrics": {"before": s.before, "after": after}, "time_s": total, "cpu_s": cpu, "timing_s": timing,
        "peak_mem_bytes": peak, **changed_storage(adapter.model, base.state), "passes": passes,
        "steps": step_info, "epochs": [], "selected_epoch": None,
    }
    entry["mia"] = s.run_mia()
    return entry


def _sequential_report(concepts: list[str], adapter, base, s: _Steps, entries: dict) -> dict:
    """The sequential report (not written): the base, the per-step data and the methods' entries."""
    heldout = s.heldout
    return {
        "concept": s.joint.concept, "concepts": concepts, "mode": "sequential", "model": adapter.model_id,
        "base_sha256": base.sha256, "original": {"metrics": {"before": s.before}, "mia": s.mia_before},
        "data": {"steps": [{"concept": c.concept, "n_forget": int(p[0].shape[0]), "n_retain": int(p[2].shape[0]),
                            "val_sizes": v.sizes(), "curate": st[1]}
                           for c, p, v, st in zip(s.cfgs, s.pairs, s.val_suites, s.steps)],
                 "n_forget": sum(int(p[0].shape[0]) for p in s.pairs),
                 "n_retain": [int(p[2].shape[0]) for p in s.pairs],
                 "test_sizes": s.test_suite.sizes(),
                 "mia_heldout": int(heldout[0].shape[0]) if heldout is not None else 0,
                 "world_data": str(s.steps[0][2])},
        "peak_mem_method": peak_mem_method(), "peak_mem_note": PEAK_MEM_NOTE + "; sequential: the largest step's",
        "methods": entries,
    }
