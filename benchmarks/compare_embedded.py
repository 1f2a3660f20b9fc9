"""SLUG vs FT, GA, GA+FT, SalUn, SSD on the embedded world (`slug compare`), with SLUG's time ratios.

    python benchmarks/compare_embedded.py [--concept NAME ...] [--threads 1] [--out DIR] [--methods ...]
                                          [--select-metric forget_top5|forget_top1] [--lr-sweep [LR,...]]
                                          [--retain-identity-fraction F ...]
                                          [--json benchmarks/results/compare_embedded.json]

For each concept (default: the demo's identity; repeat ``--concept`` for more) prints the Table-1-style table (test
metrics, MIA, time incl. validation, peak memory, storage), SLUG's time as a fraction of SalUn's and GA+FT's (issue #4
target: <= 1/5), the methods reaching test FA@5 = 0 and, among them, whose utility and related-identity drops are
smallest, and the wall time of the comparison (target: <= 10 min on 2 cores). ``--json`` writes all of it.
This is the embedded tiny CLIP world, not ViT-B/32.

``--retain-identity-fraction F`` (repeatable: a sweep) replaces the curated retain set (91% pairs of the other
identities, the pool's share) by 900 pool pairs of which a share F names other identities and the rest are utility
pairs; the last table then gives, per share and concept, each forgetting method's utility and related drops.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from slugkit.report.compare import compare_table, reaching_fa5_zero, time_ratios
from slugkit.workflows.compare import DEFAULT_METHODS, CompareConfig, run_compare
from slugkit.world import render as world


def claims(rep: dict) -> dict:
    """The done-when claims of issue #4 for one comparison, as measured (test metrics)."""
    before = rep["original"]["metrics"]["before"]
    zero = reaching_fa5_zero(rep)
    drops = {k: {"utility": before["utility_top1"] - rep["methods"][k]["metrics"]["after"]["utility_top1"],
                 "related": before["related_top1"] - rep["methods"][k]["metrics"]["after"]["related_top1"]}
             for k in rep["methods"]}
    out = {"reaching_fa5_zero": zero, "drops": drops, "slug_reaches_fa5_zero": "slug" in zero}
    for key in ("utility", "related"):
        among = {k: drops[k][key] for k in zero}
        out[f"smallest_{key}_drop_among_reaching"] = min(among, key=among.get) if among else None
        out[f"slug_{key}_drop_smallest_among_reaching"] = bool(among) and "slug" in among and \
            among["slug"] <= min(among.values())
    for key, label in (("time_s", "time"), ("cpu_s", "cpu")):
        ratios = time_ratios(rep, key)
        out[f"{label}_ratios"] = ratios
        out[f"slug_{label}_le_fifth_of_salun_and_gaft"] = all(ratios.get(k, 1.0) <= 0.2 for k in ("salun", "gaft"))
    return out


def summary(rep: dict) -> dict:
    rows = {}
    for k, e in rep["methods"].items():
        a = e["metrics"]["after"]
        rows[k] = {"forget_top1": a["forget_top1"], "forget_top5": a["forget_top5"],
                   "utility_top1": a["utility_top1"], "related_top1": a["related_top1"],
                   "mia": e["mia"]["mean"] if e.get("mia") else None, "time_s": e["time_s"], "cpu_s": e.get("cpu_s"),
                   "peak_mem_bytes": e["peak_mem_bytes"], "storage_bytes": e["storage_bytes"],
                   "selected_epoch": e["selected_epoch"], "epochs_run": len(e["epochs"]),
                   "lr": (e.get("config") or {}).get("lr"),
                   **({"ssd_point": [e["epochs"][e["selected_epoch"] - 1].get("alpha"),
                                     e["epochs"][e["selected_epoch"] - 1].get("lambda")]} if k.startswith("ssd") else {}),
                   **({"lr_sweep": e["info"]["lr_sweep"]} if (e.get("info") or {}).get("lr_sweep") else {})}
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", action="append", default=None, help="identity (repeatable; default: the demo's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="keep the outputs here, one folder per concept (default: temporary)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--select-metric", default="forget_top5", choices=["forget_top1", "forget_top5"],
                    help="baselines' epoch selection (default FA@5, SLUG's own criterion; the paper's is FA@1)")
    ap.add_argument("--lr-sweep", nargs="?", const="3e-5,1e-4,3e-4,1e-3", default=None)
    ap.add_argument("--retain-identity-fraction", type=float, action="append", default=None, metavar="F",
                    help="retain set: 900 pool pairs, a share F of other identities (repeatable: a sweep; "
                         "default: the curated retain set)")
    ap.add_argument("--json", default=None, help="write every table, ratio and claim here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    concepts = a.concept or [world.IDENTITIES[0].name]
    fractions = a.retain_identity_fraction or [None]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for frac, concept in [(f, c) for f in fractions for c in concepts]:
            name = world.identity_by_name(concept).name
            out = (Path(a.out) if a.out else Path(tmp)) / (name.replace(" ", "_") + ("" if frac is None
                                                                                      else f"-retain{frac:g}"))
            t = time.perf_counter()
            rep = run_compare(CompareConfig(
                concept=name, out=str(out), methods=a.methods.split(","), data_dir=a.data_dir, threads=a.threads,
                overwrite=True, progress=True, select_metric=a.select_metric, retain_identity_fraction=frac,
                lr_sweep=[float(x) for x in a.lr_sweep.split(",")] if a.lr_sweep else None))
            wall = time.perf_counter() - t
            c = claims(rep)
            retain = "curated retain set" if frac is None else f"retain set {100 * frac:g}% other identities"
            print(f"\nembedded world (tiny CLIP, NOT ViT-B/32), concept {name!r}, {retain}, "
                  f"{torch.get_num_threads()} thread(s), baselines selected by validation {a.select_metric} = 0\n")
            table = compare_table(rep)
            print(table)
            for k in ("salun", "gaft"):
                if k in c["time_ratios"]:
                    r, rc = c["time_ratios"][k], c["cpu_ratios"].get(k, float("nan"))
                    print(f"SLUG time / {k} time = {r:.3f} (target <= 0.2: {'met' if r <= 0.2 else 'NOT met'}); "
                          f"CPU seconds: {rc:.3f}")
            print("methods reaching test FA@5 = 0:", ", ".join(c["reaching_fa5_zero"]) or "none")
            for key in ("utility", "related"):
                best = c[f"smallest_{key}_drop_among_reaching"]
                if best:
                    print(f"  smallest {key} drop among them: {best} ({100 * c['drops'][best][key]:.2f} points)")
            print(f"wall time of the comparison {wall:.0f} s (incl. data, evaluation, MIA)")
            runs.append({"concept": name, "retain_identity_fraction": frac, "wall_s": wall, "table_md": table, "claims": c, "methods": summary(rep),
                         "original": {k: rep["original"]["metrics"]["before"][k]
                                      for k in ("forget_top1", "forget_top5", "utility_top1", "related_top1")},
                         "data": {k: rep["data"][k] for k in ("n_forget", "n_retain", "test_sizes")}})
    if len(fractions) > 1 or fractions[0] is not None:
        print("\nutility / related drop in points (test), methods reaching FA@5 = 0; '-' = did not reach it")
        meths = [m for m in a.methods.split(",") if m != "ft"]
        print("| retain identities | concept | " + " | ".join(meths) + " |")
        print("|---|---|" + "---|" * len(meths))
        for r in runs:
            d, z = r["claims"]["drops"], r["claims"]["reaching_fa5_zero"]
            cells = [f"{100 * d[m]['utility']:.2f} / {100 * d[m]['related']:.2f}" if m in z else "-" for m in meths]
            f = r["retain_identity_fraction"]
            print(f"| {'curated' if f is None else f'{100 * f:g}%'} | {r['concept']} | " + " | ".join(cells) + " |")
    if a.json:
        doc = {"benchmark": "benchmarks/compare_embedded.py", "world": "embedded tiny CLIP, not ViT-B/32",
               "threads": a.threads, "cpus": os.cpu_count(), "machine": platform.machine(),
               "select_metric": a.select_metric, "lr_sweep": a.lr_sweep, "methods": a.methods.split(","),
               "note": "one CPU thread on a shared 2-core machine (another training job running); time_s is wall "
                       "clock and moves a lot between runs under that load, cpu_s (process CPU seconds) much less; "
                       "metrics are deterministic",
               "runs": runs}
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
