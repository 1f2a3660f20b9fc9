"""Gradient-pass time under ``--precision``: fp32 / bf16 (and fp16 on request), same model, same batches, one run.

    python benchmarks/precision.py [--arch ViT-B-32] [--batch 16] [--repeats 3] [--precisions fp32 bf16 [fp16]]

The model is an open_clip architecture with random weights (``open_clip.create_model(arch, pretrained=None)``: no
download; ``--arch embedded`` for the shipped tiny model). A "pass" is ``slugkit.slug.gradients.compute_gradients``
over one forget and one retain batch of ``--batch`` pairs (random images, distinct captions), every candidate tensor,
exactly what ``slug unlearn`` runs. Precision is autocast over the same float32 weights (``slugkit.models.base``):
one model, its ``precision`` switched between passes. Protocol: one warm-up pass per precision, then ``--repeats``
rounds in which the precisions alternate (a burst of load on a shared machine hits one repeat, not one precision);
per precision the median and the worst pass are printed, and the ratio of medians fp32 / P (> 1: P is faster).
The gradients of each precision are compared with fp32's: the largest per-tensor relative error ‖g − g32‖/‖g32‖
and the smallest cosine, over both splits. The device is the CPU unless ``--device cuda``; fp16 is refused on the CPU
(as ``--precision fp16`` is: "use bf16 on CPU"), so ``--precisions fp32 bf16 fp16`` needs ``--device cuda``.
Every argument is checked before any work (``--threads``, ``--repeats`` >= 1, ``--batch`` >= 2: the retain loss is
contrastive; an unknown ``--arch``, a precision given twice; ``--json``: not a folder, an existing file only with
``--overwrite``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark helpers beside this script
from sweep import add_json, ints, json_out, name_list, run  # noqa: E402


def _adapter(arch: str, device: str):
    from slugkit.models import load_adapter
    from slugkit.models.open_clip import OpenClipAdapter

    if arch == "embedded":
        return load_adapter("embedded", device=device)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, device=device).eval()
    return OpenClipAdapter(model, open_clip.get_tokenizer(arch), None, {"family": "open_clip", "model": arch})


def _batch(adapter, bs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = adapter.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    imgs = torch.randn(bs, 3, size, size, generator=g)
    toks = adapter.tokenize([f"a photo of person number {seed * 1000 + i}." for i in range(bs)])
    return imgs, toks


def _pass(adapter, forget, retain, device: str):
    from slugkit.slug.gradients import compute_gradients

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    g = compute_gradients(adapter, [forget], [retain], progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, g


def _agreement(got, ref) -> dict:
    rel, cos = [], []
    for split in ("forget", "retain"):
        a, b = getattr(got, split), getattr(ref, split)
        for n in b:
            rel.append(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item())
            cos.append(torch.nn.functional.cosine_similarity(a[n].flatten(), b[n].flatten(), dim=0).item())
    return {"max_rel_err": max(rel), "median_rel_err": statistics.median(rel), "min_cos": min(cos)}


def parse(argv=None) -> argparse.Namespace:
    """The arguments, checked (an ``ap.error``, exit 2, naming the option) before any model is loaded."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights) or 'embedded'")
    ap.add_argument("--batch", type=ints(2), default=16,
                    help="pairs per batch, >= 2 (one forget and one retain batch; default 16)")
    ap.add_argument("--repeats", type=ints(1), default=3, help="timed passes per precision, after one warm-up each")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=ints(1), default=None, help="torch CPU threads (default: torch's choice)")
    add_json(ap, what="the result")
    a = ap.parse_args(argv)
    json_out(ap, a.json, a.overwrite)
    name_list(ap, "--precisions", ",".join(a.precisions), ["fp32", "bf16", "fp16"])  # one given twice
    from slugkit.models.base import check_precision

    try:
        kind = torch.device(a.device).type
    except RuntimeError:  # torch's own message lists every device type it knows
        ap.error(f"--device {a.device!r}: give cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device on this machine")
    for p in a.precisions:  # before any work: fp16 on the CPU stops here with the remedy
        try:
            check_precision(p, a.device)
        except (ValueError, RuntimeError) as e:
            ap.error(f"--precisions {p}: {e}")
    if a.arch != "embedded":
        import open_clip

        a.arch = name_list(ap, "--arch", a.arch, ["embedded", *open_clip.list_models()])[0]
    return a


def measure(a: argparse.Namespace) -> dict:
    """Time the gradient pass under each precision of ``a`` and compare the gradients with fp32's; prints the
    result and returns it."""
    if a.threads:
        torch.set_num_threads(a.threads)
    precisions = ["fp32"] + [p for p in a.precisions if p != "fp32"]
    adapter = _adapter(a.arch, a.device)
    forget, retain = _batch(adapter, a.batch, 1), _batch(adapter, a.batch, 2)
    times = {p: [] for p in precisions}
    grads = {}
    for p in precisions:  # warm-up (kernels, allocator), and each precision's gradients for the comparison
        adapter.precision = p
        grads[p] = _pass(adapter, forget, retain, a.device)[1]
    for _ in range(a.repeats):
        for p in precisions:
            adapter.precision = p
            times[p].append(_pass(adapter, forget, retain, a.device)[0])
    med = {p: statistics.median(ts) for p, ts in times.items()}
    result = {"arch": a.arch, "device": a.device, "batch": a.batch, "threads": torch.get_num_threads(),
              "repeats": a.repeats, "torch": torch.__version__,
              "seconds": {p: {"median": round(med[p], 3), "worst": round(max(ts), 3), "all": [round(t, 3) for t in ts]}
                          for p, ts in times.items()},
              "ratio_fp32_over": {p: round(med["fp32"] / med[p], 3) for p in precisions if p != "fp32"},
              "gradients_vs_fp32": {p: {k: round(v, 5) for k, v in _agreement(grads[p], grads["fp32"]).items()}
                                    for p in precisions if p != "fp32"}}
    print(f"{a.arch} on {a.device}, batch {a.batch} (1 forget + 1 retain batch), {result['threads']} threads, "
          f"{a.repeats} repeats after warm-up, torch {torch.__version__}")
    for p in precisions:
        s = result["seconds"][p]
        print(f"  {p}: gradient pass median {s['median']:.2f} s, worst {s['worst']:.2f} s")
    for p in precisions[1:]:
        ag = result["gradients_vs_fp32"][p]
        print(f"ratio fp32/{p} = {result['ratio_fp32_over'][p]:.2f}  (gradients vs fp32: max relative error "
              f"{ag['max_rel_err']:.4f}, median {ag['median_rel_err']:.4f}, min cosine {ag['min_cos']:.5f})")
    return result


def main(argv=None) -> int:
    a = parse(argv)
    result = measure(a)
    if a.json:
        from slugkit.common.files import write_json

        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    run(main)
