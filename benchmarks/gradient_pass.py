"""Cost of SLUG's gradient pass against a bare forward+backward over the same batches, with time and peak memory.

    python benchmarks/gradient_pass.py [--arch embedded ViT-B-32 ViT-L-14 hf-L14 hf-L14-sd hf-H14-sd] [--batch 32]

``hf-L14`` / ``hf-H14`` are transformers ``CLIPModel``s with the configs of ``openai/clip-vit-large-patch14`` (SD 1.5's
text encoder) and ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (SD 2.1's), random weights; ``-sd`` restricts the
candidates to the text-encoder layers SD consumes (all 12 for L/14, 23 of 24 for H/14), as ``--consumer sd:DIR`` does.

"bare" = for each batch: zero_grad, forward, the same loss, backward, with every parameter trainable (what any
training step pays). "slug" = ``slugkit.slug.gradients.compute_gradients`` over the same forget and retain batches:
float32 accumulation of the candidate tensors' gradients, non-candidates frozen. Ratio = slug / bare (target <= 1.25).
Real-size architectures use random weights (``open_clip.create_model(arch, pretrained=None)``: no download).
Each architecture runs in its own subprocess so that the peak RSS is its own. A GPU is used when one is present
(peak = ``torch.cuda.max_memory_allocated``); otherwise that part is skipped with a note.

The arguments are checked before any work (an unknown or repeated ``--arch``, a count < 1, ``--batch`` < 2: the retain
loss is contrastive); a run that fails is reported with its reason on stderr and the exit status is 1. ``--json``
writes ``{"command", "rows", "failed"}`` (an existing file needs ``--overwrite``); the rows are printed as JSON on
stdout as well.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark helpers beside this script
from sweep import add_json, ints, json_out, name_list, run  # noqa: E402


HF_CONFIGS = {
    "hf-L14": dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, max_position_embeddings=77, vocab_size=49408),
                   vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=224, patch_size=14),
                   projection_dim=768),
    "hf-H14": dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, max_position_embeddings=77, vocab_size=49408,
                                    hidden_act="gelu"),
                   vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                      num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"),
                   projection_dim=1024),
}


def known_archs() -> list[str]:
    """``--arch`` values: the shipped model, the transformers configs above (``-sd``: SD's text-encoder layers) and
    every open_clip architecture."""
    import open_clip

    return ["embedded", *(f"{h}{sd}" for h in HF_CONFIGS for sd in ("", "-sd")), *open_clip.list_models()]


def check_archs(ap: argparse.ArgumentParser, flag: str, archs: list[str]) -> list[str]:
    """``archs`` as the known names they mean, or ``ap.error`` for an unknown one (nearest named) or a repeat."""
    bad = [x for x in archs if "," in x]
    if bad:
        ap.error(f"{flag} takes names separated by spaces, got {bad[0]!r}")
    return name_list(ap, flag, ",".join(archs), known_archs(), how="names separated by spaces")


def _hf_adapter(arch: str, device: str):
    from slugkit.models.hf_clip import HFClipAdapter

    base = arch.removesuffix("-sd")
    a = HFClipAdapter.from_config(HF_CONFIGS[base], seed=0)
    a.model.to(device)
    if arch.endswith("-sd"):  # the text-encoder layers SD reads: all of L/14's, 23 of H/14's 24
        n = a.model.config.text_config.num_hidden_layers - (1 if base == "hf-H14" else 0)
        keep = tuple(f"text_model.encoder.layers.{i}." for i in range(n))
        a.restrict_candidates(lambda name: name.startswith(keep), consumer="sd")
    return a


def _adapter(arch: str, device: str):
    from slugkit.models import load_adapter
    from slugkit.models.open_clip import OpenClipAdapter

    if arch.startswith("hf-"):
        return _hf_adapter(arch, device)
    if arch == "embedded":
        a = load_adapter("embedded")
        a.model.to(device)
        return a
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, device=device).eval()
    return OpenClipAdapter(model, open_clip.get_tokenizer(arch), None, {"family": "open_clip", "model": arch})


def _batches(adapter, n, bs, device, seed):
    g = torch.Generator().manual_seed(seed)
    if hasattr(adapter.model, "visual"):
        size = adapter.model.visual.image_size
    else:
        size = adapter.model.config.vision_config.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    out = []
    for b in range(n):
        imgs = torch.randn(bs, 3, size, size, generator=g).to(device)
        toks = adapter.tokenize([f"a photo of person number {b * bs + i}." for i in range(bs)]).to(device)
        out.append((imgs, toks))
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(arch: str, bs: int, n: int, device: str, repeats: int = 2) -> dict:
    from slugkit.slug.gradients import compute_gradients

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    adapter = _adapter(arch, device)
    forget, retain = _batches(adapter, n, bs, device, 1), _batches(adapter, n, bs, device, 2)
    model = adapter.model
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def bare_pass():
        for imgs, toks in forget:
            model.zero_grad(set_to_none=True)
            adapter.forget_loss_per_sample(imgs, toks).sum().backward()
        for imgs, toks in retain:
            model.zero_grad(set_to_none=True)
            (adapter.retain_loss(imgs, toks) * imgs.shape[0]).backward()
        model.zero_grad(set_to_none=True)

    # warm-up of both loss paths (allocator, kernels), then the two passes alternate and each keeps its fastest
    # repeat: neither pays the first-call costs, and a burst of load on a shared machine hits one repeat, not the
    # ratio (an earlier version warmed up only the forget path and timed each pass once, bare first, which
    # under-reported the ratio: ViT-B-32 0.64 there, 1.07 with this protocol on an idle machine)
    adapter.forget_loss_per_sample(*forget[0]).sum().backward()
    model.zero_grad(set_to_none=True)
    (adapter.retain_loss(*retain[0]) * bs).backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bares, slugs, bare_peak = [], [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        bare_pass()
        _sync(device)
        bares.append(time.perf_counter() - t)
        if device == "cuda":
            bare_peak = max(bare_peak or 0, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        grads = compute_gradients(adapter, iter(forget), iter(retain), adapter.candidate_names(), progress=False)
        _sync(device)
        slugs.append(time.perf_counter() - t)
        del grads
    bare, slug = min(bares), min(slugs)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(p.numel() for p in model.parameters())
    return {"arch": arch, "device": device, "batch": bs, "batches_per_split": n, "params": n_params,
            "candidates": len(adapter.candidate_names()), "repeats": repeats, "bare_s": round(bare, 3),
            "slug_s": round(slug, 3),
            "ratio_slug_over_bare": round(slug / bare, 3),
            "peak_bytes": int(peak), "peak_kind": "cuda max_memory_allocated" if device == "cuda" else
            "process peak RSS", "model_rss_bytes": int(rss_model - rss0) if device == "cpu" else None,
            "bare_peak_bytes": bare_peak, "threads": torch.get_num_threads(),
            "bare_all_s": [round(x, 3) for x in bares],
            "slug_all_s": [round(x, 3) for x in slugs]}


def _reason(out: subprocess.CompletedProcess) -> str:
    """Why a child run failed: its last error line, or how it ended (a signal: killed, e.g. out of memory)."""
    lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
    if out.returncode < 0:
        import signal

        name = signal.Signals(-out.returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return lines[-1].strip() if lines else f"exit status {out.returncode}, nothing on stderr"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["embedded", "ViT-B-32"],
                    help="embedded, hf-L14[-sd], hf-H14[-sd] or an open_clip architecture (default embedded ViT-B-32)")
    ap.add_argument("--batch", type=ints(2), default=32, help="pairs per batch, >= 2 (default 32)")
    ap.add_argument("--batches", type=ints(1), default=2, help="batches per split (forget and retain)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the CPU, and a GPU when present)")
    ap.add_argument("--repeats", type=ints(1), default=2, help="alternating bare/SLUG repeats; each keeps its fastest")
    add_json(ap, what="the rows")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.arch[0], a.batch, a.batches, a.device or "cpu", a.repeats)))
        return 0
    json_out(ap, a.json, a.overwrite)
    if a.device is not None and a.device.split(":")[0] not in ("cpu", "cuda"):
        ap.error(f"--device {a.device!r}: give cpu, cuda or cuda:N")
    if a.device is not None and a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device on this machine")
    a.arch = check_archs(ap, "--arch", a.arch)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if not torch.cuda.is_available() and not a.device:
        print("GPU: skipped (no CUDA device on this machine)")
    rows, failed = [], []
    for dev in ([a.device] if a.device else devices):
        for arch in a.arch:
            cmd = [sys.executable, __file__, "--one", "--arch", arch, "--batch", str(a.batch), "--batches",
                   str(a.batches), "--device", dev, "--repeats", str(a.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                why = _reason(out)
                failed.append({"arch": arch, "device": dev, "returncode": out.returncode, "error": why})
                print(f"{arch} on {dev}: FAILED: {why}\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{arch:10s} {dev}: bare fwd+bwd {r['bare_s']:.2f} s, slug gradient pass {r['slug_s']:.2f} s, "
                  f"ratio {r['ratio_slug_over_bare']:.2f}; peak {r['peak_bytes'] / 2**30:.2f} GiB ({r['peak_kind']})",
                  flush=True)
    if rows:
        print(json.dumps(rows, indent=2))
    if failed:
        print(f"{len(failed)} of {len(failed) + len(rows)} runs FAILED: "
              + "; ".join(f"{f['arch']} on {f['device']}: {f['error']}" for f in failed), file=sys.stderr)
    if a.json:
        from slugkit.common.files import write_json

        write_json(a.json, {"command": ["benchmarks/gradient_pass.py", *(sys.argv[1:] if argv is None else argv)],
                            "rows": rows, "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
