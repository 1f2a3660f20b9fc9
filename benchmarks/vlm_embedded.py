"""Run `slug demo --target vlm` for identities of the embedded world and check issue 14's thresholds.

    python benchmarks/vlm_embedded.py [--concepts "Jowen Gormere,Hasa Malwick" | --first 10] [--joint A,B,...]
                                      [--gradient clip|vlm] [--json results.json] [--threads 1] ...

Per run, on the VLM's answers to "What's the name of the person in this image?" on held-out test images (50 of each
target, 20 of every other identity; utility: three questions on 10 images of each of the 30 object classes), a run
**passes** when

* each target is named in <= 5% of its images after the patch (from >= 90% before),
* the other identities' naming drops by <= 0.05 on average, and
* the utility questions' accuracy drops by <= 0.03;

the worst single other identity's drop is reported next to it (median and worst over the runs). A **refusal** (no
layer/step met the validation criteria) is not a pass; it must carry a reason and leave no run folder. ``--joint``:
one extra run unlearning those identities together (the paper's 10-identity setting). ``--json`` is rewritten
atomically after every run (``"complete": false`` until the sweep ends; an existing file needs ``--overwrite``). Exit
status 1 when a run crashed (a refusal is a result, not a crash).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sweep helpers beside this script, however it is loaded
from sweep import (add_json, by_method, counts, floats, folder, guarded_run, ints,  # noqa: E402
                   json_out, name_list, print_counts, progress_off, run, seed_type, unfinished_line)

TARGET_AFTER, TARGET_BEFORE, OTHER_DROP, UTILITY_DROP = 0.05, 0.90, 0.05, 0.03


def run_one(concepts: list[str], a) -> dict:
    from slugkit.workflows.vlm_demo import run_vlm_demo

    name = " + ".join(concepts)
    r, row, t = guarded_run(name, lambda out: run_vlm_demo(
        concepts, out, data_dir=a.data_dir, other_budget=a.other_budget, neighbour_budget=a.neighbour_budget,
        utility_budget=a.utility_budget, val_images=a.val_images, max_searched=a.max_searched, seed=a.seed,
        threads=a.threads, gradient=a.gradient, per_image=a.per_image, n_protect=a.n_protect, progress=False,
        max_layers=a.max_layers, vlm_dir=a.vlm_model, name_prob=a.name_prob, neighbours_k=a.neighbours_k,
        fallback=a.fallback))
    if row is not None:
        return row
    v = r["vlm"]
    b, af, c = v["before"], v["after"], v["collateral"]
    checks = {
        "target_before>=0.9": all(x >= TARGET_BEFORE - 1e-9 for x in b["target_named_by_concept"].values()),
        "target_after<=0.05": all(x <= TARGET_AFTER + 1e-9 for x in af["target_named_by_concept"].values()),
        "other_drop<=0.05": c["mean_drop"] <= OTHER_DROP + 1e-9,
        "utility_drop<=0.03": b["utility_accuracy"] - af["utility_accuracy"] <= UTILITY_DROP + 1e-9,
    }
    return {"concept": name, "method": r["method"], "layer": r["layer"], "layers_edited": r.get("layers_edited") or [],
            "step_size": r["step_size"],
            "target": [b["target_named"], af["target_named"]], "other": [c["mean_before"], c["mean_after"]],
            "mean_drop": c["mean_drop"], "worst": c["worst"], "neighbours": c["neighbours"]["concepts"],
            "utility": [b["utility_accuracy"], af["utility_accuracy"]],
            "utility_drop": b["utility_accuracy"] - af["utility_accuracy"],
            "verdict": r["verdict"]["status"], "checks": checks, "passed": all(checks.values()),
            "timing_s": {"slug": r["timing_s"]["slug_total"], "vlm_eval": r["timing_s"]["vlm_eval"],
                         "wall": time.perf_counter() - t}}


def line(row: dict) -> str:
    done = unfinished_line(row)
    if done is not None:
        return done
    w = row["worst"]
    verdict = "PASS" if row["passed"] else "FAIL " + str([k for k, v in row["checks"].items() if not v])
    how = " (fine-tune, not SLUG)" if row.get("method") == "layer-finetune" else ""
    return (f"{row['concept']:16s} {row['layer'][21:]:30s}{how} named {row['target'][0]:.2f}->{row['target'][1]:.2f}  "
            f"others {row['other'][0]:.3f}->{row['other'][1]:.3f} (drop {row['mean_drop']:+.3f})  worst "
            f"{w['concept']} {w['before']:.2f}->{w['after']:.2f}  utility {row['utility'][0]:.3f}->"
            f"{row['utility'][1]:.3f}  {verdict}  {row['timing_s']['wall']:.0f} s")


def summary(rows: list[dict]) -> dict:
    ran, out = counts(rows)
    if ran:
        md, wd, ud = [r["mean_drop"] for r in ran], [r["worst"]["drop"] for r in ran], [r["utility_drop"] for r in ran]
        out.update(mean_drop_median=statistics.median(md), mean_drop_worst=max(md),
                   worst_identity_drop_median=statistics.median(wd), worst_identity_drop_worst=max(wd),
                   utility_drop_median=statistics.median(ud), utility_drop_worst=max(ud),
                   slowest_s=max(r["timing_s"]["wall"] for r in ran))
    # --fallback: which method made each patch (SLUG's step or the labelled fine-tune), with its passes
    out["by_method"] = by_method(ran)
    return out


def main():
    from slugkit.common.files import write_json
    from slugkit.world import render as world
    from slugkit.cli.vlm import name_prob as vlm_name_prob
    from slugkit.workflows.vlm_demo import DEFAULT_NAME_PROB
    from slugkit.world.demo_data import default_concept

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default=None, help="comma list (default: the demo's identity)")
    ap.add_argument("--first", type=ints(1), default=None, help="the world's first N identities, one run each")
    ap.add_argument("--joint", default=None, help="comma list: one more run unlearning these jointly")
    ap.add_argument("--threads", type=ints(1), default=1, help="torch CPU threads per run (default 1)")
    ap.add_argument("--val-images", type=ints(1), default=10, help="validation images of the target (default 10)")
    ap.add_argument("--other-budget", type=floats(0.0, 1.0), default=0.05,
                    help="the other identities' mean naming drop allowed (default 0.05)")
    ap.add_argument("--neighbour-budget", type=floats(0.0, 1.0), default=None,
                    help="default: the verdict's worst budget")
    ap.add_argument("--utility-budget", type=floats(0.0, 1.0), default=0.03,
                    help="utility accuracy drop allowed (default 0.03)")
    ap.add_argument("--max-searched", type=ints(1), default=None, help="layers the VLM search tries (default: all)")
    ap.add_argument("--gradient", default="vlm", choices=["clip", "vlm"],
                    help="the edit's gradient: clip = SLUG's CLIP forget gradient (the paper's, and the default of "
                         "`slug demo --target vlm`); vlm = the VLM's own answer gradient (this benchmark's default)")
    ap.add_argument("--per-image", action="store_true",
                    help="with --gradient vlm: one protected direction per image of each other identity, instead "
                         "of one per identity (the mean over its images)")
    ap.add_argument("--n-protect", type=ints(1), default=None,
                    help="with --gradient vlm: images per protected identity (default: the workflow's, 5)")
    ap.add_argument("--fallback", default=None, choices=["finetune"],
                    help="slug demo's --vlm-fallback: when SLUG refuses, a one-layer fine-tune on the VLM's answers "
                         "(not SLUG; rows say method layer-finetune), after every SLUG round --max-layers allows")
    ap.add_argument("--max-layers", type=int, default=2, choices=[1, 2, 3],
                    help="layers the fallback may edit when no single layer passes (default 2, the demo's; 1 = the "
                         "paper's single layer)")
    ap.add_argument("--neighbours-k", type=ints(1), default=None,
                    help="the search bounds the worst of the K nearest identities (20 validation images each; "
                         "default 5; 59: every other identity, as the verdict does, ~2.5x the time)")
    ap.add_argument("--name-prob", type=vlm_name_prob, default=DEFAULT_NAME_PROB,
                    help="`slug demo --vlm-name-prob`: a validation image counts as naming the target when the VLM "
                         "gives its full and last name this summed probability or more (default "
                         f"{DEFAULT_NAME_PROB:g}; off: the answers only)")
    ap.add_argument("--seed", type=seed_type(), default=0, help="seed of the run (default 0)")
    ap.add_argument("--data-dir", type=folder(), default=None,
                    help="the world's data folder (default: written on first use)")
    ap.add_argument("--vlm-model", type=folder(must_exist=True), default=None,
                    help="a `slug world train-vlm` folder (default: the shipped VLM); with --clip, its own CLIP")
    add_json(ap)
    a = ap.parse_args()
    json_out(ap, a.json, a.overwrite)
    if a.gradient != "vlm" and (a.per_image or a.n_protect is not None):
        ap.error("--per-image and --n-protect apply to --gradient vlm only")
    names = world.identity_names()
    if a.first is not None and a.concepts is not None:  # --concepts was dropped without a word
        ap.error("--first and --concepts exclude each other")
    if a.first is not None and a.first > len(names):
        ap.error(f"--first {a.first}: the world has {len(names)} identities")
    if a.first is not None:
        runs = [[n] for n in names[:a.first]]
    else:
        runs = [[c] for c in name_list(ap, "--concepts", default_concept() if a.concepts is None else a.concepts,
                                       names)]
    if a.joint is not None:
        joint = name_list(ap, "--joint", a.joint, names)
        if len(joint) < 2:
            ap.error("--joint unlearns several identities in one run: give at least two")
        runs.append(joint)
    progress_off()
    rows = []
    for concepts in runs:
        rows.append(run_one(concepts, a))
        print(line(rows[-1]), flush=True)
        if a.json:
            write_json(a.json, {"rows": rows, "summary": summary(rows), "options": vars(a), "complete": False})
    s = summary(rows)
    print_counts(s, "runs")
    verdicts = [r["verdict"] for r in rows if r.get("verdict")]  # the demo's own verdict bounds the worst identity
    if verdicts:
        print("the demo's verdicts of the runs that wrote a patch (they bound the worst single identity too): "
              + ", ".join(f"{k} {verdicts.count(k)}" for k in ("pass", "warn", "fail") if k in verdicts))
    if "mean_drop_median" in s:
        print(f"other identities' drop: median {s['mean_drop_median']:+.3f}, worst {s['mean_drop_worst']:+.3f}; worst "
              f"single identity: median {s['worst_identity_drop_median']:+.3f}, worst "
              f"{s['worst_identity_drop_worst']:+.3f}; utility drop: median {s['utility_drop_median']:+.3f}, worst "
              f"{s['utility_drop_worst']:+.3f}; slowest run {s['slowest_s']:.0f} s")
    if a.json:
        write_json(a.json, {"rows": rows, "summary": s, "options": vars(a), "complete": True})
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    run(main)
