"""Naive vs cached step-size search on the embedded model (one run, same inputs, identical metrics required).

    python benchmarks/search_cache.py [--concept NAME] [--threads 1] [--json FILE [--overwrite]]

Naive = every evaluation re-encodes all validation images and all classifier prompts with the edited model (what
the official code does, minus its deepcopy). Cached = the tower the edit cannot change is encoded once, and the
edited tower re-runs only from the stage that reads the edited tensor, on activations cached once per layer.

The arguments are checked before any work (an unknown ``--concept``, ``--threads`` < 1, a ``--json`` folder or an
existing file without ``--overwrite``). Exit status 1 when the two searches disagree (the result is still printed
and written).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from slugkit.cli.args import nonempty
from slugkit.world import render as world

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark helpers beside this script
from sweep import add_json, folder, ints, json_out, run  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concept", type=nonempty, default=world.IDENTITIES[0].name,
                    help=f"identity of the embedded world (default {world.IDENTITIES[0].name})")
    ap.add_argument("--threads", type=ints(1), default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--data-dir", type=folder(), default=None)
    add_json(ap, what="the result")
    a = ap.parse_args(argv)
    json_out(ap, a.json, a.overwrite)
    try:
        a.concept = world.identity_by_name(a.concept).name
    except KeyError as e:
        ap.error(f"--concept: {e.args[0]}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    from slugkit.eval.zeroshot import SuiteEvaluator
    from slugkit.models import load_adapter
    from slugkit.slug.gradients import compute_gradients
    from slugkit.slug.layers import rank_layers
    from slugkit.slug.search import search_layers
    from slugkit.workflows.inputs import batches, build_suite, load_pairs
    from slugkit.workflows.world_runs import world_config

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
    if a.json:
        from slugkit.common.files import write_json

        write_json(a.json, out)
    if not same:
        print("cached and naive searches disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(main)
