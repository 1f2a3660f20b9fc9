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
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this script, however it is loaded
from sweep import add_json, folder, ints, json_out, run  # noqa: E402

CHECKS = ("fa5_before>=0.9", "fa5_after<=0.05", "fa1_after<=0.02", "related_drop<=0.05", "utility_drop<=0.02",
          "patch<=1%")  # computed by score()
WORST = 0.20


def worst_single(r):
    c = r.get("collateral") or {}
    return (c.get("worst") or {}).get("drop", 0.0), (c.get("worst") or {}).get("concept")


VARIANTS = {"default": {}, "paper": {"protect_neighbours": 0, "max_layers": 1, "worst_budget": None}}


KEYS = {"protect_neighbours": int, "max_layers": int, "worst_budget": float, "margin": float, "selection": str}


def variant(spec: str) -> dict:
    """``default``, ``paper`` or ``key=value`` items, comma-separated (``paper,margin=1.0``: later items win).
    Raises ``ValueError`` naming an unknown variant or key, or a value of the wrong kind (they were tracebacks:
    ``KeyError: 'bogus'``); the values' ranges are checked by the run's own configuration, before any run."""
    out, seen = {}, set()
    for kv in spec.split(","):
        name = kv.split("=", 1)[0]
        if name in seen:  # `paper,paper`, `margin=1,margin=2`: the first was dropped without a word
            raise ValueError(f"{name!r} is given twice")
        seen.add(name)
        if "=" not in kv:
            if kv not in VARIANTS:
                raise ValueError(f"unknown variant {kv!r}; give {', '.join(VARIANTS)} or key=value items over "
                                 f"{', '.join(KEYS)}")
            out.update(VARIANTS[kv])
            continue
        k, v = kv.split("=", 1)
        if k not in KEYS:
            raise ValueError(f"unknown key {k!r} in {kv!r}; the keys are {', '.join(KEYS)}")
        try:
            out[k] = None if v == "none" and k == "worst_budget" else KEYS[k](v)
        except ValueError:
            raise ValueError(f"{kv!r}: {k} takes {KEYS[k].__name__} values") from None
    return out


def drop(r, key):
    return r["metrics"]["before"][key] - r["metrics"]["after"][key]


def _settings(spec: str):
    """``(UnlearnConfig overrides, SearchConfig)`` of a variant, checked as a run checks them."""
    v = variant(spec)
    search = SearchConfig(**{k: v.pop(k) for k in ("margin", "selection", "worst_budget") if k in v})
    return v, search


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=ints(1), default=None, help="the world's first N identities (default: all 60)")
    ap.add_argument("--threads", type=ints(1), default=1)
    ap.add_argument("--variant", default="default", help="default, paper or key=value,... (module docstring)")
    add_json(ap, what="the summary and every run (rewritten after each run)")
    ap.add_argument("--data-dir", type=folder(), default=None)
    ap.add_argument("--rescore", default=None, help="re-score a saved --json file with the current checks (written "
                                                     "to --json, or in place with --overwrite)")
    a = ap.parse_args()
    json_out(ap, a.json, a.overwrite)
    if a.limit is not None and a.limit > len(world.identity_names()):  # it ran all 60
        ap.error(f"--limit {a.limit}: the world has {len(world.identity_names())} identities")
    if a.rescore:
        return rescore(ap, a)
    try:
        overrides, search = _settings(a.variant)
        from slugkit.workflows.unlearn import UnlearnConfig

        UnlearnConfig(concept="x", out="x", forget="x", retain="x", val_identities="x", test_identities="x",
                      search=search, **overrides)  # the ranges (margin=-1, max_layers=0), before any run
    except (TypeError, ValueError) as e:
        ap.error(f"--variant {a.variant!r}: {e}")
    torch.set_num_threads(a.threads)
    data = ensure_world_data(a.data_dir, progress=False)
    adapter = load_adapter("embedded")
    names = world.identity_names()[: a.limit]
    rows, t0 = [], time.perf_counter()
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as tmp:
            cfg, _, _ = world_config(name, tmp, data, progress=False, search=search, **overrides)
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
        layers = " + ".join(e["layer"] if isinstance(e, dict) else e for e in rows[-1]["layers"]) or r["layer"]
        print(f"[{i + 1}/{len(names)}] {name}: layer {layers} FA@5 {r['metrics']['after']['forget_top5']:.2f} "
              f"FA@1 {r['metrics']['after']['forget_top1']:.2f} related drop {drop(r, 'related_top1'):+.3f} "
              f"utility drop {drop(r, 'utility_top1'):+.3f} worst drop {wd:.2f} ({wc}) {r['timing_s']['total']:.1f}s "
              f"{'ok' if rows[-1]['core_and_worst'] else 'core' if core else 'FAIL'}", flush=True)
        if a.json:  # after every run: a stopped sweep keeps what it measured
            write_json(a.json, {"summary": summarise(rows, a.variant, time.perf_counter() - t0), "runs": rows,
                                "complete": False})
    summary = summarise(rows, a.variant, time.perf_counter() - t0)
    print(json.dumps(summary, indent=2))
    if a.json:
        write_json(a.json, {"summary": summary, "runs": rows, "complete": True})
    return 1 if summary["failed_runs"] else 0


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


def rescore(ap, a) -> int:
    """Re-score a saved run with the current checks (e.g. after the float32 slack of ``EPS`` was added): written to
    ``--json``, or in place with ``--overwrite``; the summary's other entries (its ``note``) are kept."""
    path = a.json or a.rescore
    if not a.json and not a.overwrite:  # it rewrote the file in place and dropped its note
        ap.error(f"--rescore {a.rescore}: give --json OUT for the re-scored file, or --overwrite to rewrite it in "
                 "place")
    try:
        d = json.loads(Path(a.rescore).read_text())
        rows = [r if "error" in r else score(r) for r in d["runs"]]
        summary = {**d["summary"], **summarise(rows, d["summary"]["variant"], d["summary"]["wall_s"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"--rescore {a.rescore}: not a results file of this script ({type(e).__name__}: {e})")
    write_json(path, {**d, "summary": summary, "runs": rows})
    print(json.dumps(summary, indent=2))
    return 0


def write_json(path: str, obj: dict) -> None:
    from slugkit.common.files import write_json as atomic_json

    atomic_json(path, obj)


if __name__ == "__main__":
    run(main)
