"""Run `slug demo --target sd` for object concepts of the embedded world and check the thresholds (issues 3 and 12).

    python benchmarks/sd_embedded.py [--concepts "red triangle,blue star" | --all] [--json results.json]
                                     [--threads 1] [--step slug|null-space] [--neighbour-budget 0.2] ...

``--all``: every object concept whose base recognition is >= 0.70 — measured first on the unedited pipeline with the
demo's own target images (``--n-target`` images, the seeds the demo reports with), so a concept the generator cannot
draw is left out before its 3-minute run. One demo takes ~3 minutes on one thread; the ~30 concepts ~90 minutes.

Per concept, on generated images (fixed seeds, the same before and after; ``--n-target`` of the concept, >= 20 of each
of the 5 nearest neighbours by the pipeline's text encoder, ``--n-other`` of every other concept), a concept
**passes** when

* the forgotten concept is recognised in <= 10% of its images after the patch,
* the other concepts' recognition drops by <= 0.05 on average (29 concepts), and
* no single other concept drops by more than 0.20 (the verdict's worst-drop budget);

a **refusal** (no layer/step met the validation criteria) is not a pass; it must carry a reason and leave no run
folder (no patch). Printed: the pass fraction, the median and worst mean drop and the median and worst single-
neighbour drop over the runs that wrote a patch, the median and worst single other concept's drop (every other
concept) and the slowest run; ``--json`` writes every row (rewritten atomically after each concept, ``"complete":
false`` until the sweep ends, so a partial sweep survives; an existing file needs ``--overwrite``). Exit status 1 when
a run crashed (a refusal is a result, not a crash).

``--merge A.json B.json --json ALL.json`` (no run): the rows of parts of one sweep — two processes over disjoint
concepts, or a sweep stopped and finished in a later session (a stopped part gives the rows of its finished runs) —
as one sweep, the summary recomputed; parts run with other options, or sharing a concept, are refused.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sweep helpers beside this script, however it is loaded
from sweep import (add_json, by_method, counts, floats, folder, guarded_run, ints,  # noqa: E402
                   json_out, merge, name_list, print_counts, run, seed_type, unfinished_line, write_complete)

TARGET_AFTER, MEAN_DROP, WORST_DROP, BASE = 0.10, 0.05, 0.20, 0.70
CHECKS = {
    "target_after<=0.1": lambda g, c: g["after"]["generated_target_recognised"] <= TARGET_AFTER + 1e-9,
    "mean_other_drop<=0.05": lambda g, c: c["mean_drop"] <= MEAN_DROP + 1e-9,
    "worst_other_drop<=0.2": lambda g, c: c["worst"]["drop"] <= WORST_DROP + 1e-9,
}


def base_recognition(n_target: int, seed: int, threads: int) -> dict[str, float]:
    """Each concept's recognition on the unedited pipeline, with the images the demo reports for it as the target."""
    import torch

    from slugkit.workflows.sd_demo import _clip_and_pipeline
    from slugkit.world import t2i

    torch.set_num_threads(threads)
    _, pipe, _, judge = _clip_and_pipeline(None)
    plan = t2i.generation_plan(None, 0, n_target, seed_base=10_000 * (seed + 1))  # every concept n_target images
    return t2i.recognition(pipe, judge, plan)[0]


def reuse_unedited_images() -> dict:
    """Make ``slugkit.world.t2i.recognition`` keep what the **unedited** pipeline drew for a plan and give it back when
    the same plan is asked of the same weights again — exact (the same call on the same weights, prompts, seeds, steps,
    guidance and thread count; a hash of every weight of the pipeline and the judge is part of the key), so a sweep's
    figures are those it would give without it. With ``--n-other`` = ``--n-neighbour`` = ``--n-target`` every
    concept's test plan is the same plan (each concept's images in concept order; the base recognition's too), so
    each concept after the first skips the "before" half of its evaluation (1,500 images at 50 per concept, ~6 min on
    one core). Only the first fingerprint seen (the unedited pipeline: a run measures it before any edit) is kept.
    Returns the cache's counters (``hits``, ``misses``)."""
    import hashlib

    import torch

    from slugkit.world import t2i

    original, kept, stats = t2i.recognition, {}, {"hits": 0, "misses": 0, "unedited": None}

    def fingerprint(*objs) -> str:
        h = hashlib.sha256()
        for obj in objs:
            mods = [obj] if isinstance(obj, torch.nn.Module) else [
                v for _, v in sorted(vars(obj).items()) if isinstance(v, torch.nn.Module)]
            for m in mods:
                for name, t in m.state_dict().items():
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def recognition(pipe, judge, plan, steps=20, guidance=t2i.DEFAULT_GUIDANCE, progress=False):
        fp = fingerprint(pipe, judge)
        stats["unedited"] = stats["unedited"] or fp
        if fp != stats["unedited"]:
            return original(pipe, judge, plan, steps, guidance, progress)
        key = (fp, tuple(plan), steps, guidance, torch.get_num_threads())
        if key in kept:
            stats["hits"] += 1
        else:
            stats["misses"] += 1
            kept[key] = original(pipe, judge, plan, steps, guidance, progress)
        rec, imgs, pred = kept[key]
        return dict(rec), imgs.clone(), list(pred)

    t2i.recognition = recognition
    return stats


def run_one(concept: str, a) -> dict:
    from slugkit.workflows.sd_demo import run_sd_demo

    r, row, t = guarded_run(concept, lambda out: run_sd_demo(
        concept, out, data_dir=a.data_dir, n_target=a.n_target, n_other=a.n_other, n_neighbour=a.n_neighbour,
        val_neighbour=a.val_neighbour, neighbour_budget=a.neighbour_budget, other_budget=a.other_budget,
        selection=a.selection, step=a.step, null_energy=a.null_space_energy, null_layers=a.null_space_layers,
        max_searched=a.max_searched, max_layers=a.max_layers, neighbours_k=a.neighbours_k, val_other=a.val_other,
        seed=a.seed, threads=a.threads, fallback=a.fallback, progress=False))
    if row is not None:
        return row
    g, c = r["generation"], r["generation"]["collateral"]
    nbs = c["neighbours"]["concepts"]
    checks = {k: bool(f(g, c)) for k, f in CHECKS.items()}
    return {"concept": concept, "method": r["method"], "layer": r["layer"], "group": r["group"],
            "step_size": r["step_size"],
            "layers_edited": r.get("layers_edited") or [], "step": r["chooser"].get("step", "slug"),
            "clip_step_size": r["chooser"]["clip_step_size"],
            "target": [g["before"]["generated_target_recognised"], g["after"]["generated_target_recognised"]],
            "other": [c["mean_before"], c["mean_after"]], "mean_drop": c["mean_drop"],
            "worst": c["worst"], "neighbours": nbs, "worst_neighbour_drop": max((n["drop"] for n in nbs), default=0.0),
            "clip_score": [g["before"]["clip_score"], g["after"]["clip_score"]],
            "clip_fa1": [r["metrics"]["before"]["forget_top1"], r["metrics"]["after"]["forget_top1"]],
            "verdict": r["verdict"]["status"], "verdict_reasons": [x["code"] for x in r["verdict"]["reasons"]],
            "checks": checks, "passed": all(checks.values()),
            "timing_s": {"slug": r["timing_s"]["slug_total"], "generation_eval": r["timing_s"]["generation_eval"],
                         "wall": time.perf_counter() - t}}


def line(row: dict) -> str:
    done = unfinished_line(row)
    if done is not None:
        return done
    w, nb = row["worst"], ", ".join(f"{n['concept']} {n['before']:.2f}->{n['after']:.2f}" for n in row["neighbours"])
    layers = " + ".join(e["layer"][19:] for e in row.get("layers_edited") or []) or row["layer"][19:]
    layers += " (fine-tune, not SLUG)" if row.get("method") == "layer-finetune" else ""
    return (f"{row['concept']:16s} {layers:34s} target {row['target'][0]:.2f}->{row['target'][1]:.2f}  "
            f"others {row['other'][0]:.3f}->{row['other'][1]:.3f} (drop {row['mean_drop']:+.3f})  worst "
            f"{w['concept']} {w['before']:.2f}->{w['after']:.2f}  neighbours [{nb}]  "
            f"{'PASS' if row['passed'] else 'FAIL ' + str([k for k, v in row['checks'].items() if not v])}  "
            f"{row['timing_s']['wall']:.0f} s")


def summary(rows: list[dict]) -> dict:
    """Pass counts, and over the runs that wrote a patch the median and worst of: the mean other drop, the worst
    single other concept's drop (every other concept: the pass check's; the neighbours' alone missed cyan circle
    -0.30 for red triangle) with the concept it is, the worst nearest neighbour's drop, and the slowest run."""
    ran, out = counts(rows)
    if ran:
        md, nd = [r["mean_drop"] for r in ran], [r["worst_neighbour_drop"] for r in ran]
        od = [r["worst"]["drop"] for r in ran]
        worst = max(ran, key=lambda r: r["worst"]["drop"])
        out.update(mean_drop_median=statistics.median(md), mean_drop_worst=max(md),
                   worst_other_drop_median=statistics.median(od), worst_other_drop_worst=max(od),
                   worst_other=f"{worst['worst']['concept']} (unlearning {worst['concept']})",
                   neighbour_drop_median=statistics.median(nd), neighbour_drop_worst=max(nd),
                   slowest_s=max(r["timing_s"]["wall"] for r in ran))
    out["by_method"] = by_method(ran)  # --fallback: SLUG's step or the labelled fine-tune made each patch
    return out


def write_json(path: str, obj: dict) -> None:
    """``obj`` as JSON at ``path``, atomically (slugkit's own writer: temporary sibling, renamed, usual file mode)."""
    from slugkit.common.files import write_json as atomic_json

    atomic_json(path, obj)


def report(rows: list[dict], json_path: str | None, options: dict, base_recognition: dict | None = None,
           complete: bool = True) -> dict:
    """Print the sweep's summary of ``rows`` (pass count, by method, the medians and worsts) and write the ``--json``
    file (first: a closed pipe on the printing lost it); a sweep's end and ``--merge`` both end here. Returns the
    summary."""
    s = summary(rows)
    write_complete(json_path, rows, s, options, complete=complete, base_recognition=base_recognition)
    print_counts(s, "concepts")
    if "mean_drop_median" in s:
        print(f"mean other drop: median {s['mean_drop_median']:+.3f}, worst {s['mean_drop_worst']:+.3f}; worst "
              f"other concept: median {s['worst_other_drop_median']:+.3f}, worst {s['worst_other_drop_worst']:+.3f} "
              f"({s['worst_other']}); nearest neighbour: median {s['neighbour_drop_median']:+.3f}, worst "
              f"{s['neighbour_drop_worst']:+.3f}; slowest run {s['slowest_s']:.0f} s")
    return s


def main():
    from slugkit.workflows.sd_demo import DEFAULT_SD_CONCEPT
    from slugkit.world import t2i

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", default=None, help="comma list (default: red triangle)")
    ap.add_argument("--all", action="store_true", help="every concept with base recognition >= 0.70")
    ap.add_argument("--threads", type=ints(1), default=1)
    ap.add_argument("--n-target", type=ints(1), default=50)
    ap.add_argument("--n-other", type=ints(1), default=10)
    ap.add_argument("--n-neighbour", type=ints(1), default=20)
    ap.add_argument("--val-neighbour", type=ints(1), default=20)
    ap.add_argument("--neighbours-k", type=ints(1), default=None,
                    help="nearest concepts searched and reported with --val-neighbour/--n-neighbour images and the "
                         "worst bound (default: the demo's 5; 29 = every other concept)")
    ap.add_argument("--val-other", type=ints(1), default=1, help="validation images per other concept (default 1)")
    ap.add_argument("--neighbour-budget", type=floats(0.0, 1.0), default=None,
                    help="default: the verdict's worst budget")
    ap.add_argument("--other-budget", type=floats(0.0, 1.0), default=0.05)
    ap.add_argument("--selection", default="shift", choices=["shift", "neighbour", "clip"])
    ap.add_argument("--step", default="slug", choices=["slug", "null-space"])
    ap.add_argument("--null-space-energy", type=floats(0.0, 1.0), default=None)
    ap.add_argument("--null-space-layers", default="front", choices=["front", "all"],
                    help="null-space step: search the CLIP Pareto layers that forgot (front) or every Linear group")
    ap.add_argument("--max-searched", type=ints(1), default=None,
                    help="the generator search tries at most this many layers (default: every candidate)")
    ap.add_argument("--max-layers", type=int, default=2, choices=[1, 2, 3],
                    help="layers the fallback may edit when no single layer forgets within the budgets (default 2, "
                         "the demo's; 1 = the paper's single layer)")
    ap.add_argument("--fallback", default=None, choices=["finetune"],
                    help="slug demo's --sd-fallback: when every SLUG round refuses, a one-layer fine-tune of the "
                         "text encoder on the generator (not SLUG; rows say method layer-finetune)")
    ap.add_argument("--seed", type=seed_type(), default=0)
    ap.add_argument("--data-dir", type=folder(), default=None)
    ap.add_argument("--merge", nargs="+", metavar="PART.json", default=None,
                    help="no run: merge the --json files of runs of one sweep over disjoint concepts (two processes, "
                         "or a sweep finished in a later session; a part whose run was stopped gives its finished "
                         "rows, and the merged file says \"complete\": false) into --json, the summary recomputed")
    add_json(ap)
    a = ap.parse_args()
    json_out(ap, a.json, a.overwrite)
    if a.merge:
        return merge(ap, a.merge, a.json, report, key=("concept",), partial_ok=True,
                     row_keys=("worst", "mean_drop", "worst_neighbour_drop", "timing_s"))
    if a.all and a.concepts is not None:
        ap.error("--all and --concepts exclude each other")
    if a.neighbours_k is not None and a.neighbours_k >= len(t2i.concept_names()):
        ap.error(f"--neighbours-k {a.neighbours_k}: there are {len(t2i.concept_names()) - 1} other concepts")
    concepts = name_list(ap, "--concepts", a.concepts or DEFAULT_SD_CONCEPT, t2i.concept_names())
    base, reused = None, reuse_unedited_images()
    if a.all:
        base = base_recognition(a.n_target, a.seed, a.threads)
        concepts = [c for c in t2i.concept_names() if base[c] >= BASE]
        print(f"{len(concepts)}/{len(base)} concepts recognised in >= {BASE:.0%} of {a.n_target} images before: "
              f"left out {', '.join(f'{c} {v:.2f}' for c, v in base.items() if v < BASE) or 'none'}", flush=True)
    rows = []
    for concept in concepts:
        rows.append(run_one(concept, a))
        print(line(rows[-1]), flush=True)
        if a.json:  # after every row, so that a partial sweep survives
            write_json(a.json, {"rows": rows, "summary": summary(rows), "base_recognition": base,
                                "options": vars(a), "complete": False})
    s = report(rows, a.json, vars(a), base)
    print(f"the unedited pipeline's images: {reused['hits']} plan(s) reused, {reused['misses']} drawn")
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    run(main)
