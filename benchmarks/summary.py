"""All of slugkit's headline ratios side by side, measured in one run (``make bench``).

    python benchmarks/summary.py [--archs embedded ViT-B-32] [--json benchmarks/results/summary.json]

1. gradient pass / bare forward+backward over the same batches (target <= 1.25), per architecture, with peak memory
   (``benchmarks/gradient_pass.py``; random-init real architectures, CPU, and a GPU when present);
2. step-size search naive / cached on the embedded model (target >= 5x) with identical metrics
   (``benchmarks/search_cache.py``);
3. end-to-end SLUG vs SalUn and GA+FT on the embedded world, each method's time including the validation it needs
   (``slug compare``; target: SLUG <= 1/5 of each).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(args):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def _json_block(text: str):
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    dec = json.JSONDecoder()
    obj, _ = dec.raw_decode(text[start:])
    return obj


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["embedded", "ViT-B-32"])
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    grad_out = _run([str(HERE / "gradient_pass.py"), "--arch", *a.archs, "--batches", str(a.batches)])
    grad_rows = _json_block(grad_out[grad_out.index("\n[") + 1:])
    cache = _json_block(_run([str(HERE / "search_cache.py")]))

    import torch

    from slugkit.workflows.compare import CompareConfig, run_compare, time_ratios
    from slugkit.world import render as world

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rep = run_compare(CompareConfig(concept=world.IDENTITIES[0].name, out=str(Path(tmp) / "c"),
                                        methods=["slug", "gaft", "salun"], threads=1, overwrite=True,
                                        progress=False))
    ratios = time_ratios(rep)
    summary = {
        "gradient_pass": grad_rows,
        "search_cache": cache,
        "end_to_end": {"slug_time_over": ratios,
                       "times_s": {k: m["time_s"] for k, m in rep["methods"].items()}},
        "wall_s": time.perf_counter() - t0,
    }
    print("\n=== slugkit benchmarks, one run ===")
    for r in grad_rows:
        print(f"gradient pass / bare fwd+bwd  {r['arch']:>9s} {r['device']} batch {r['batch']}: "
              f"{r['ratio_slug_over_bare']:.2f}  (target <= 1.25; {r['slug_s']:.2f} s vs {r['bare_s']:.2f} s, "
              f"peak {r['peak_bytes'] / 2**30:.2f} GiB {r['peak_kind']})")
    print(f"search naive / cached (embedded, {cache['evaluations']} evaluations): "
          f"{cache['ratio_naive_over_cached']:.1f}x  (target >= 5; identical metrics: {cache['identical_metrics']})")
    for k, v in ratios.items():
        print(f"end-to-end SLUG time / {k} time (embedded, incl. validation): {v:.2f}  (target <= 0.20)")
    print(f"wall {summary['wall_s']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
