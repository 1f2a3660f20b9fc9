"""All of slugkit's headline ratios side by side, measured in one run (``make bench``).

    python benchmarks/summary.py [--archs embedded ViT-B-32] [--json benchmarks/results/summary.json [--overwrite]]

1. gradient pass / bare forward+backward over the same batches (target <= 1.25), per architecture, with peak memory
   (``benchmarks/gradient_pass.py``; random-init real architectures, CPU, and a GPU when present);
2. step-size search naive / cached on the embedded model (target >= 5x) with identical metrics
   (``benchmarks/search_cache.py``);
3. end-to-end SLUG vs SalUn and GA+FT on the embedded world, each method's time including the validation it needs
   (``slug compare``; target: SLUG <= 1/5 of each).

Each ratio line says whether its target is ``met`` or ``NOT met`` (a target not met is a result, not a failure). A
stage that fails (a crash, a run that failed) is printed with its error, the others still run, and the exit status
is 1; ``--json`` is then not written, so that a failed run does not replace published figures. The arguments are
checked before any work (an unknown or repeated ``--archs``, ``--batches`` < 1, a ``--json`` folder or an existing
file without ``--overwrite``: ``make bench`` passes it, as it regenerates ``benchmarks/results/summary.json``).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmark helpers beside this script
from sweep import add_json, ints, json_out, run  # noqa: E402

GRADIENT_TARGET, SEARCH_TARGET, END_TO_END_TARGET = 1.25, 5.0, 0.20


def _run(script: str, args: list[str], json_path: Path) -> tuple[dict | None, str | None]:
    """Run ``script`` (beside this one) with ``args`` and ``--json json_path``: ``(its JSON or None, None or why it
    failed)``; it failed when it exited non-zero or wrote nothing (the reason: how it ended and the last lines of its
    stderr). A script that failed may still have written what it measured (gradient_pass.py: the rows that ran)."""
    out = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(json_path)],
                         capture_output=True, text=True)
    doc = json.loads(json_path.read_text()) if json_path.is_file() else None
    if out.returncode == 0 and doc is not None:
        return doc, None
    tail = "\n".join(out.stderr.strip().splitlines()[-15:]) or "(nothing on stderr)"
    how = f"exit status {out.returncode}" if out.returncode >= 0 else f"killed by signal {-out.returncode}"
    return doc, f"{script} {' '.join(args)}: {how}{'' if doc is not None else ', no JSON written'}\n{tail}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def end_to_end_stage() -> dict:
    import torch

    from slugkit.workflows.compare import CompareConfig, run_compare, time_ratios
    from slugkit.world import render as world

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rep = run_compare(CompareConfig(concept=world.IDENTITIES[0].name, out=str(Path(tmp) / "c"),
                                        methods=["slug", "gaft", "salun"], threads=1, overwrite=True,
                                        progress=False))
    ratios = time_ratios(rep)
    if not ratios:
        raise RuntimeError("the comparison measured no SLUG time ratio (SLUG or both baselines left no time)")
    return {"slug_time_over": ratios, "times_s": {k: m["time_s"] for k, m in rep["methods"].items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["embedded", "ViT-B-32"],
                    help="gradient-pass architectures (default embedded ViT-B-32; see gradient_pass.py --arch)")
    ap.add_argument("--batches", type=ints(1), default=1, help="gradient pass: batches per split (default 1)")
    add_json(ap, what="every figure")
    a = ap.parse_args(argv)
    json_out(ap, a.json, a.overwrite)
    from gradient_pass import check_archs

    a.archs = check_archs(ap, "--archs", a.archs)
    t0 = time.perf_counter()
    failed = {}

    def fail(stage: str, why: str) -> None:
        failed[stage] = why
        print(f"FAILED: {stage}: {why}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("[summary] gradient pass / bare ...", file=sys.stderr, flush=True)
        doc, why = _run("gradient_pass.py", ["--arch", *a.archs, "--batches", str(a.batches)], tmp / "grad.json")
        grad_rows = (doc or {}).get("rows", [])  # the architectures that ran, even when another failed
        if why:
            fail("gradient_pass", why)
        print("[summary] search naive / cached ...", file=sys.stderr, flush=True)
        cache, why = _run("search_cache.py", [], tmp / "cache.json")  # written even when the searches disagree
        if why:
            fail("search_cache", why)
    print("[summary] end-to-end SLUG / baselines ...", file=sys.stderr, flush=True)
    e2e = None
    try:
        e2e = end_to_end_stage()
    except Exception as e:  # a crash of the in-process stage: printed and counted, like a failed script
        fail("end_to_end", f"{type(e).__name__}: {e}\n{traceback.format_exc().rstrip()}")
    targets = []

    def target(line: str, name: str, value: float, limit: str, ok: bool) -> None:
        targets.append({"what": name, "value": value, "target": limit, "met": ok})
        print(f"{line}: {_met(ok)}")

    print("\n=== slugkit benchmarks, one run ===")
    for r in grad_rows:
        v = r["ratio_slug_over_bare"]
        target(f"gradient pass / bare fwd+bwd {r['arch']} {r['device']} batch {r['batch']} {v:.2f} "
               f"({r['slug_s']:.2f} s vs {r['bare_s']:.2f} s, peak {r['peak_bytes'] / 2**30:.2f} GiB "
               f"{r['peak_kind']}; target <= {GRADIENT_TARGET:.2f})", f"gradient pass / bare, {r['arch']} "
               f"{r['device']}", v, f"<= {GRADIENT_TARGET}", v <= GRADIENT_TARGET)
    if cache:
        v = cache["ratio_naive_over_cached"]
        target(f"search naive / cached {v:.1f}x (embedded, {cache['evaluations']} evaluations, identical metrics: "
               f"{cache['identical_metrics']}; target >= {SEARCH_TARGET:g}x with identical metrics)",
               "search naive / cached", v, f">= {SEARCH_TARGET} and identical metrics",
               v >= SEARCH_TARGET and bool(cache["identical_metrics"]))
    for k, v in (e2e or {}).get("slug_time_over", {}).items():
        target(f"end-to-end SLUG time / {k} time {v:.2f} (embedded, incl. validation; target <= "
               f"{END_TO_END_TARGET:.2f})", f"end-to-end SLUG time / {k} time", v, f"<= {END_TO_END_TARGET}",
               v <= END_TO_END_TARGET)
    wall = time.perf_counter() - t0
    print(f"targets met: {sum(t['met'] for t in targets)} of {len(targets)}; wall {wall:.0f} s")
    if failed:
        print(f"{len(failed)} stage(s) FAILED: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in failed.items())
              + (f"; {a.json} not written" if a.json else ""), file=sys.stderr)
        return 1
    if a.json:
        from slugkit.common.files import write_json

        write_json(a.json, {"gradient_pass": grad_rows, "search_cache": cache, "end_to_end": e2e,
                            "targets": targets, "wall_s": wall})
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    run(main)
