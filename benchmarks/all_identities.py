"""Run `slug demo` for every identity of the embedded world and report how many meet each acceptance threshold.

    python benchmarks/all_identities.py [--limit N] [--json results.json] [--variant default|paper|...] [--threads 1]

Variants: ``default`` (today's defaults: neighbour-protected step, worst-drop layer choice, multi-layer fallback),
``paper`` (``--protect-neighbours 0 --max-layers 1``, no worst budget: the paper's single-layer step with the 1.1x
margin), or ``key=value,...`` over ``protect_neighbours``, ``max_layers``, ``worst_budget`` (``none``), ``margin``,
``selection``. Run two variants in two processes to compare them side by side (one thread each).

Thresholds (issues #2 and #12, on held-out test images, 50 per identity): FA@5 before >= 0.9; FA@5 after <= 0.05;
FA@1 after <= 0.02; related top-1 drop (mean over the 59 others) <= 0.05; utility top-1 drop <= 0.02; patch <= 1% of
the model bytes ("core"); and every other identity's top-1 drop <= 0.20 ("worst"). Also printed: median and worst of
the mean related drop and of the worst single-identity drop, and the run time.
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
from slugkit.workflows.verdict import EPS  # float32 fractions: 30/1500 = 0.02 must count as a drop of 0.02
from slugkit.workflows.world_runs import world_config
from slugkit.world.demo_data import ensure_world_data

CHECKS = ("fa5_before>=0.9", "fa5_after<=0.05", "fa1_after<=0.02", "related_drop<=0.05", "utility_drop<=0.02",
          "patch<=1%")  # computed by score()
WORST = 0.20


def worst_single(r):
    c = r.get("collateral") or {}
    return (c.get("worst") or {}).get("drop", 0.0), (c.get("worst") or {}).get("concept")


VARIANTS = {"default": {}, "paper": {"protect_neighbours": 0, "max_layers": 1, "worst_budget": None}}


def variant(spec: str) -> dict:
    """``default``, ``paper`` or ``key=value`` items, comma-separated (``paper,margin=1.0``: later items win)."""
    out = {}
    for kv in spec.split(","):
        if "=" not in kv:
            out.update(VARIANTS[kv])
            continue
        k, v = kv.split("=")
        out[k] = None if v == "none" else (float(v) if k in ("worst_budget", "margin") else
                                           v if k == "selection" else int(v))
    return out


def drop(r, key):
    return r["metrics"]["before"][key] - r["metrics"]["after"][key]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", default="default")
    ap.add_argument("--json", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--rescore", default=None, help="re-score a saved --json file with the current checks, in place")
    a = ap.parse_args()
    if a.rescore:
        return rescore(a.rescore)
    torch.set_num_threads(a.threads)
    data = ensure_world_data(a.data_dir, progress=False)
    adapter = load_adapter("embedded")
    names = world.identity_names()[: a.limit]
    rows, t0 = [], time.perf_counter()
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as tmp:
            v = variant(a.variant)
            search = {k: v.pop(k) for k in ("margin", "selection", "worst_budget") if k in v}
            cfg, _, _ = world_config(name, tmp, data, progress=False, search=SearchConfig(**search), **v)
            try:
                r = run_unlearn(cfg, adapter=adapter)
            except Exception as e:  # a failed search counts as failing every threshold
                rows.append({"concept": name, "error": str(e)})
                print(f"[{i + 1}/{len(names)}] {name}: FAILED {e}")
                continue
        wd, wc = worst_single(r)
        rows.append(score({"concept": name, "layer": r["layer"], "layers": r.get("layers_edited", [r["layer"]]),
                           "relative_change": r["relative_change"], "worst_drop": wd, "worst_concept": wc,
                           "verdict": r["verdict"]["status"],
                           "before": r["metrics"]["before"], "after": r["metrics"]["after"],
                           "related_drop": drop(r, "related_top1"), "utility_drop": drop(r, "utility_top1"),
                           "total_s": r["timing_s"]["total"],
                           "passed": {"patch<=1%": r["patch"]["bytes"] <= 0.01 * r["model_bytes"]}}))
        core = rows[-1]["core"]
        print(f"[{i + 1}/{len(names)}] {name}: layer {r['layer']} FA@5 {r['metrics']['after']['forget_top5']:.2f} "
              f"FA@1 {r['metrics']['after']['forget_top1']:.2f} related {-drop(r, 'related_top1'):+.3f} "
              f"utility {-drop(r, 'utility_top1'):+.3f} worst {wd:.2f} ({wc}) {r['timing_s']['total']:.1f}s "
              f"{'ok' if rows[-1]['core_and_worst'] else 'core' if core else 'FAIL'}", flush=True)
    summary = summarise(rows, a.variant, time.perf_counter() - t0)
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")


def score(row: dict) -> dict:
    """The row's checks recomputed from its test metrics with the current rules (the patch check is kept)."""
    b, a = row["before"], row["after"]
    passed = {"fa5_before>=0.9": b["forget_top5"] >= 0.9, "fa5_after<=0.05": a["forget_top5"] <= 0.05,
              "fa1_after<=0.02": a["forget_top1"] <= 0.02,
              "related_drop<=0.05": b["related_top1"] - a["related_top1"] <= 0.05 + EPS,
              "utility_drop<=0.02": b["utility_top1"] - a["utility_top1"] <= 0.02 + EPS,
              "patch<=1%": row["passed"]["patch<=1%"]}
    core = all(passed[k] for k in passed if k != "fa5_before>=0.9")
    return {**row, "passed": passed, "core": core, "core_and_worst": core and row["worst_drop"] <= WORST + EPS,
            "all": all(passed.values())}


def summarise(rows: list[dict], name: str, wall_s: float) -> dict:
    ok = [r for r in rows if "error" not in r]
    n = len(rows)
    summary = {"identities": n, "failed_runs": n - len(ok), "variant": name, "settings": variant(name),
               "fraction_passing": {k: sum(r["passed"][k] for r in ok) / n for k in CHECKS},
               "core_pass": sum(r["core"] for r in ok), "core_and_worst_pass": sum(r["core_and_worst"] for r in ok),
               "verdicts": {s: sum(r["verdict"] == s for r in ok) for s in ("pass", "warn", "fail")}}
    for key in ("related_drop", "utility_drop", "worst_drop", "total_s"):
        vals = [r[key] for r in ok]
        summary[key] = {"median": statistics.median(vals), "worst": max(vals)} if vals else None
    summary["after_forget_top5"] = {"median": statistics.median([r["after"]["forget_top5"] for r in ok]),
                                    "worst": max(r["after"]["forget_top5"] for r in ok)} if ok else None
    summary["layers"], summary["layers_edited"] = {}, {}
    for r in ok:
        summary["layers"][r["layer"]] = summary["layers"].get(r["layer"], 0) + 1
        summary["layers_edited"][len(r["layers"])] = summary["layers_edited"].get(len(r["layers"]), 0) + 1
    summary["wall_s"] = wall_s
    return summary


def rescore(path: str) -> None:
    """Re-score a saved run with the current checks (e.g. after the float32 slack of ``EPS`` was added) in place."""
    d = json.loads(Path(path).read_text())
    rows = [r if "error" in r else score(r) for r in d["runs"]]
    d = {"summary": summarise(rows, d["summary"]["variant"], d["summary"]["wall_s"]), "runs": rows}
    Path(path).write_text(json.dumps(d, indent=2) + "\n")
    print(json.dumps(d["summary"], indent=2))


if __name__ == "__main__":
    main()
