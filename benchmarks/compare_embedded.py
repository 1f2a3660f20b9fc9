"""SLUG vs FT, GA, GA+FT, SalUn, SSD on the embedded world (`slug compare`), with SLUG's time ratios.

    python benchmarks/compare_embedded.py [--concept NAME] [--threads 1] [--out DIR] [--methods ...]
                                          [--select-metric forget_top1|forget_top5]

Prints the Table-1-style table (test metrics, MIA, time incl. validation, peak memory, storage), SLUG's time as a
fraction of SalUn's and GA+FT's (issue #4 target: <= 1/5), the methods reaching test FA@5 = 0 and, among them, whose
utility and related-identity drops are smallest, and the total wall time (target: <= 10 min on 2 cores).
This is the embedded tiny CLIP world, not ViT-B/32.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from slugkit.compare import DEFAULT_METHODS, CompareConfig, compare_table, run_compare, time_ratios
from slugkit.data import world


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default=world.IDENTITIES[0].name)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="keep the outputs here (default: a temporary folder)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--select-metric", default="forget_top1", choices=["forget_top1", "forget_top5"],
                    help="baselines' epoch selection (paper: FA@1; forget_top5 = SLUG's own criterion)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "compare"
        t = time.perf_counter()
        rep = run_compare(CompareConfig(concept=a.concept, out=str(out), methods=a.methods.split(","),
                                        data_dir=a.data_dir, threads=a.threads, overwrite=True, progress=True,
                                        select_metric=a.select_metric))
        wall = time.perf_counter() - t
    print(f"\nembedded world (tiny CLIP, NOT ViT-B/32), concept {rep['concept']!r}, {torch.get_num_threads()} "
          f"thread(s), baselines selected by validation {a.select_metric} = 0\n")
    print(compare_table(rep))
    ratios = time_ratios(rep)
    for k in ("salun", "gaft"):
        if k in ratios:
            print(f"SLUG time / {k} time = {ratios[k]:.3f} (target <= 0.2: {'met' if ratios[k] <= 0.2 else 'NOT met'})")
    before = rep["original"]["metrics"]["before"]
    zero = {k: e for k, e in rep["methods"].items() if e["metrics"]["after"]["forget_top5"] == 0}
    print("methods reaching test FA@5 = 0:", ", ".join(zero) or "none")
    for key, label in (("utility_top1", "utility"), ("related_top1", "related")):
        drops = {k: before[key] - e["metrics"]["after"][key] for k, e in zero.items()}
        if drops:
            best = min(drops, key=drops.get)
            print(f"  smallest {label} drop among them: {best} ({100 * drops[best]:.2f} points)")
    print(f"total wall time {wall:.0f} s (incl. data, evaluation, MIA)")


if __name__ == "__main__":
    main()
