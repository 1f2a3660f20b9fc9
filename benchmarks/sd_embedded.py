"""Run `slug demo --target sd` for several object concepts of the embedded world and check issue #3's thresholds.

    python benchmarks/sd_embedded.py [--concepts "red triangle,blue star"] [--json results.json] [--threads 1]

Thresholds (on generated images, fixed seeds; >= 50 of the forgotten concept, >= 10 of each of the 29 others):
the forgotten concept is recognised by the embedded CLIP in >= 70% of its images before the patch and <= 10% after;
recognition of the other concepts' images drops by <= 10 points (mean over the 29 concepts).
"""

import argparse
import json
import tempfile
import time

CHECKS = {
    "target_before>=0.7": lambda g: g["before"]["generated_target_recognised"] >= 0.7,
    "target_after<=0.1": lambda g: g["after"]["generated_target_recognised"] <= 0.1,
    "other_drop<=0.1": lambda g: g["before"]["generated_other_recognised"] - g["after"]["generated_other_recognised"]
    <= 0.1 + 1e-9,
}


def main():
    from slugkit.workflows.sd_demo import DEFAULT_SD_CONCEPT, run_sd_demo
    from slugkit.slug.search import SearchFailed

    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", default=DEFAULT_SD_CONCEPT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-target", type=int, default=50)
    ap.add_argument("--n-other", type=int, default=10)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for concept in [c.strip() for c in a.concepts.split(",") if c.strip()]:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            try:
                r = run_sd_demo(concept, f"{d}/run", data_dir=a.data_dir, n_target=a.n_target, n_other=a.n_other,
                                threads=a.threads, progress=False)
            except SearchFailed as e:  # refused: no layer/step meets the validation criteria
                rows.append({"concept": concept, "refused": str(e), "checks": {k: False for k in CHECKS},
                             "timing_s": {"wall": time.perf_counter() - t}})
                print(f"{concept:16s} REFUSED: {e}", flush=True)
                continue
        g = r["generation"]
        row = {"concept": concept, "layer": r["layer"], "group": r["group"], "step_size": r["step_size"],
               "clip_step_size": r["chooser"]["clip_step_size"],
               "target": [g["before"]["generated_target_recognised"], g["after"]["generated_target_recognised"]],
               "other": [g["before"]["generated_other_recognised"], g["after"]["generated_other_recognised"]],
               "related": [g["before"]["generated_related_recognised"], g["after"]["generated_related_recognised"]],
               "clip_score": [g["before"]["clip_score"], g["after"]["clip_score"]],
               "clip_fa1": [r["metrics"]["before"]["forget_top1"], r["metrics"]["after"]["forget_top1"]],
               "checks": {k: bool(f(g)) for k, f in CHECKS.items()},
               "timing_s": {"slug": r["timing_s"]["slug_total"], "generation_eval": r["timing_s"]["generation_eval"],
                            "wall": time.perf_counter() - t}}
        rows.append(row)
        print(f"{concept:16s} {row['layer'][19:]:38s} target {row['target'][0]:.2f}->{row['target'][1]:.2f}  "
              f"others {row['other'][0]:.3f}->{row['other'][1]:.3f} (drop {row['other'][0] - row['other'][1]:+.3f})"
              f"  related {row['related'][0]:.3f}->{row['related'][1]:.3f}  "
              f"{'PASS' if all(row['checks'].values()) else 'FAIL ' + str(row['checks'])}  "
              f"{row['timing_s']['wall']:.0f} s", flush=True)
    n = sum(all(r["checks"].values()) for r in rows)
    print(f"{n}/{len(rows)} concepts meet all thresholds")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "passed": n, "total": len(rows)}, f, indent=2)


if __name__ == "__main__":
    main()
