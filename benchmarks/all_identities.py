"""Run `slug demo` for every identity of the embedded world and report how many meet each acceptance threshold.

    python benchmarks/all_identities.py [--limit N] [--json results.json] [--margin 1.1] [--selection utility]

Thresholds (issue #2, on held-out test images): FA@5 before >= 0.9; FA@5 after <= 0.05; FA@1 after <= 0.02;
related top-1 drop <= 0.05; utility top-1 drop <= 0.02; patch <= 1% of the model bytes; timing_s.total <= 60 s.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slugkit.world import render as world
from slugkit.models import load_adapter
from slugkit.slug.search import SearchConfig
from slugkit.workflows.unlearn import run_unlearn
from slugkit.workflows.world_runs import world_config
from slugkit.world.demo_data import ensure_world_data

CHECKS = {
    "fa5_before>=0.9": lambda r: r["metrics"]["before"]["forget_top5"] >= 0.9,
    "fa5_after<=0.05": lambda r: r["metrics"]["after"]["forget_top5"] <= 0.05,
    "fa1_after<=0.02": lambda r: r["metrics"]["after"]["forget_top1"] <= 0.02,
    "related_drop<=0.05": lambda r: drop(r, "related_top1") <= 0.05,
    "utility_drop<=0.02": lambda r: drop(r, "utility_top1") <= 0.02,
    "patch<=1%": lambda r: r["patch"]["bytes"] <= 0.01 * r["model_bytes"],
    "total<=60s": lambda r: r["timing_s"]["total"] <= 60,
}


def drop(r, key):
    return r["metrics"]["before"][key] - r["metrics"]["after"][key]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margin", type=float, default=1.1)
    ap.add_argument("--selection", default="min")
    ap.add_argument("--json", default=None)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = ensure_world_data(a.data_dir, progress=False)
    adapter = load_adapter("embedded")
    names = world.identity_names()[: a.limit]
    rows, t0 = [], time.perf_counter()
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as tmp:
            cfg, _, _ = world_config(name, tmp, data, progress=False,
                                     search=SearchConfig(margin=a.margin, selection=a.selection))
            try:
                r = run_unlearn(cfg, adapter=adapter)
            except Exception as e:  # a failed search counts as failing every threshold
                rows.append({"concept": name, "error": str(e)})
                print(f"[{i + 1}/{len(names)}] {name}: FAILED {e}")
                continue
        passed = {k: bool(f(r)) for k, f in CHECKS.items()}
        rows.append({"concept": name, "layer": r["layer"], "relative_change": r["relative_change"],
                     "before": r["metrics"]["before"], "after": r["metrics"]["after"],
                     "related_drop": drop(r, "related_top1"), "utility_drop": drop(r, "utility_top1"),
                     "total_s": r["timing_s"]["total"], "passed": passed, "all": all(passed.values())})
        print(f"[{i + 1}/{len(names)}] {name}: layer {r['layer']} FA@5 {r['metrics']['after']['forget_top5']:.2f} "
              f"FA@1 {r['metrics']['after']['forget_top1']:.2f} related {-drop(r, 'related_top1'):+.3f} "
              f"utility {-drop(r, 'utility_top1'):+.3f} {r['timing_s']['total']:.1f}s {'ok' if rows[-1]['all'] else 'FAIL'}")
    ok = [r for r in rows if "error" not in r]
    n = len(rows)
    summary = {"identities": n, "failed_runs": n - len(ok), "margin": a.margin, "selection": a.selection,
               "fraction_passing": {k: sum(r["passed"][k] for r in ok) / n for k in CHECKS},
               "fraction_all": sum(r["all"] for r in ok) / n}
    for key in ("related_drop", "utility_drop", "total_s"):
        vals = [r[key] for r in ok]
        summary[key] = {"median": statistics.median(vals), "worst": max(vals)} if vals else None
    summary["after_forget_top5"] = {"median": statistics.median([r["after"]["forget_top5"] for r in ok]),
                                    "worst": max(r["after"]["forget_top5"] for r in ok)} if ok else None
    summary["layers"] = {}
    for r in ok:
        summary["layers"][r["layer"]] = summary["layers"].get(r["layer"], 0) + 1
    summary["wall_s"] = time.perf_counter() - t0
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
