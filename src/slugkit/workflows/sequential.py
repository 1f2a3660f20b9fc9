"""Several concepts unlearned one after another (``slug demo --concepts A,B --sequential``): each SLUG run starts
from the model with the earlier patches applied; the patches are chained into one."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..common.files import final_paths, write_json
from ..common.runfolder import run_folder
from ..eval.collateral import NEIGHBOURS_K, nearest_concepts
from ..eval.zeroshot import SuiteEvaluator
from .inputs import build_suite
from .records import brief, collateral_of
from .unlearn import UnlearnConfig, run_unlearn
from .verdict import sequential_verdict, verdict_fields


def run_sequential(configs: list[UnlearnConfig], out: str | Path, adapter=None, overwrite: bool = False) -> dict:
    """Unlearn several concepts one after another: concept k is unlearned from the model with the patches of
    concepts 1..k-1 applied, each run writing its own folder ``out/<k>-<Name>/``; the patches are then folded into
    one (:func:`slugkit.patch.chain_patches`) in ``out/patch`` and every concept is re-scored on the final model.

    Writes ``out/result.json`` (``mode: "sequential"``, per-concept forget metrics before (base model) / after
    (final model), shared related/utility metrics, each step's layer and step size, patch bytes). The model is
    returned to its base weights (bit-exact) before returning. The whole run is assembled in a temporary folder and
    renamed to ``out`` at the end (:func:`slugkit.common.runfolder.run_folder`); the step folders are part of it when
    they lie inside ``out`` (``out`` claimed first, :func:`slugkit.workflows.unlearn.check_out_dir`, or the
    configurations pointed into a private folder).
    """
    from ..models import load_adapter
    from ..patch import apply_patch, chain_patches, load_patch, revert_patch, save_patch

    with run_folder(out, overwrite) as stage:
        if adapter is None:
            c0 = configs[0]
            adapter = load_adapter(c0.model, c0.pretrained, family=c0.family, device=c0.device,
                                   precision=c0.precision)
        t0 = time.perf_counter()
        applied, steps = [], []
        try:
            step_verdicts = []
            for cfg in configs:
                r = run_unlearn(cfg, adapter=adapter)
                p = load_patch(Path(cfg.out) / "patch")
                apply_patch(adapter.model, p)
                applied.append(p)
                step_verdicts.append(r["verdict"])
                steps.append({"concept": cfg.concept, "out": str(cfg.out), "layer": r["layer"],
                              "step_size": r["step_size"], "layers_edited": r.get("layers_edited") or [],
                              "verdict": r["verdict"]["status"], "metrics_at_step": r["metrics"]})
            chained = chain_patches(applied)
            # one suite over all concepts: per-concept FA, and related accuracy over the identities none of them is
            joint = replace(configs[0], concepts=[c.concept for c in configs])
            suite = build_suite(adapter, joint, joint.test_identities, joint.utility_test)
            final = SuiteEvaluator(adapter, suite).base_metrics()
        finally:
            for p in reversed(applied):
                revert_patch(adapter.model, p)
        base_eval = SuiteEvaluator(adapter, suite)
        base = base_eval.base_metrics()
        near = nearest_concepts(base_eval.class_embeddings(), suite.names, suite.target_list(), NEIGHBOURS_K)
        chained.meta["metrics"] = {"before": brief(base), "after": brief(final)}
        verdict = sequential_verdict(joint.concepts, configs[0].search.metric, configs[0].search.threshold, base,
                                     final, configs[0].budgets, step_verdicts).to_json()
        # the chained patch carries the whole run's verdict, as a single run's does (slug apply warns on "fail";
        # it carried none, so a failed sequential run's patch applied without a word: eighth trial)
        chained.meta["extra"] = {**(chained.meta.get("extra") or {}), **verdict_fields(verdict)}
        save_patch(chained, stage / "patch", overwrite=overwrite)
        result = {
            "mode": "sequential", "method": "slug", "concepts": [c.concept for c in configs],
            "model": adapter.model_id, "steps": steps,
            "per_concept": {c: {"before": base["forget_by_concept"][c], "after": final["forget_by_concept"][c]}
                            for c in joint.concepts},
            "metrics": {"before": base, "after": final},
            "collateral": collateral_of(base, final, near),
            "verdict": verdict,
            "patch": {"path": "patch", "bytes": (stage / "patch" / "patch.safetensors").stat().st_size,
                      "tensors": chained.names},
            "model_bytes": adapter.model_bytes(), "timing_s": {"total": time.perf_counter() - t0},
        }
        write_json(stage / "result.json", result)
        result = final_paths(result)  # the step folders' final paths (while the temporary folder is registered)
    return result
