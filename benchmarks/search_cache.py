"""Naive vs cached step-size search on the embedded model (one run, same inputs, identical metrics required).

    python benchmarks/search_cache.py [--concept NAME] [--threads 1]

Naive = every evaluation re-encodes all validation images and all classifier prompts with the edited model (what
the official code does, minus its deepcopy). Cached = the tower the edit cannot change is encoded once, and the
edited tower re-runs only from the stage that reads the edited tensor, on activations cached once per layer.
"""

import argparse
import json
import tempfile
import time

import torch

from slugkit.world import render as world
from slugkit.eval.zeroshot import SuiteEvaluator
from slugkit.models import load_adapter
from slugkit.slug.gradients import compute_gradients
from slugkit.slug.layers import rank_layers
from slugkit.slug.search import search_layers
from slugkit.workflows.inputs import batches, build_suite, load_pairs
from slugkit.workflows.world_runs import world_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default=world.IDENTITIES[0].name)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _, _ = world_config(a.concept, tmp, a.data_dir, progress=False)
        adapter = load_adapter("embedded")
        f_img, f_tok, _ = load_pairs(adapter, cfg.forget, None, False, "forget")
        r_img, r_tok, _ = load_pairs(adapter, cfg.retain, None, False, "retain")
        val = build_suite(adapter, cfg, cfg.val_identities, cfg.utility_val)
    grads = compute_gradients(adapter, batches(f_img, f_tok, 64), batches(r_img, r_tok, 64), progress=False)
    table = rank_layers(adapter, grads)
    front = table.front_names()
    ratios = {r.name: r.ratio for r in table.rows}
    timings, results = {}, {}
    for mode in ("naive", "cached"):
        t = time.perf_counter()
        ev = SuiteEvaluator(adapter, val)  # base features: part of the cost of both modes
        results[mode] = search_layers(adapter, grads, front, ratios, ev, cfg.search, cached=(mode == "cached"),
                                      progress=False)
        timings[mode] = time.perf_counter() - t
    same = all(
        [(s.step_size, s.metrics) for s in rn.trajectory] == [(s.step_size, s.metrics) for s in rc.trajectory]
        and rn.val_metrics == rc.val_metrics
        for rn, rc in zip(results["naive"], results["cached"]))
    n_evals = sum(len(r.trajectory) for r in results["cached"])
    out = {"concept": a.concept, "pareto_layers": len(front), "evaluations": n_evals,
           "validation_images": int(len(val.forget) + len(val.related) + len(val.utility)),
           "naive_s": round(timings["naive"], 3), "cached_s": round(timings["cached"], 3),
           "ratio_naive_over_cached": round(timings["naive"] / timings["cached"], 2), "identical_metrics": same,
           "threads": a.threads}
    print(json.dumps(out, indent=2))
    print(f"search over {len(front)} Pareto layers ({n_evals} evaluations): naive {timings['naive']:.2f} s, "
          f"cached {timings['cached']:.2f} s -> {timings['naive'] / timings['cached']:.1f}x faster; "
          f"identical metrics: {same}")
    if not same:
        raise SystemExit("cached and naive searches disagree")


if __name__ == "__main__":
    main()
