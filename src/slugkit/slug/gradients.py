"""Step 1 of SLUG: one pass over the forget set and one over the retain set (spec §2).

Sign convention (one for every model family, DESIGN.md): L_forget = mean_i cos(f_I(x_i), f_T(t_i)) over forget pairs,
the stored forget gradient is g_f = ∇θ L_forget, and the edit is θ_l ← θ_l − η·g_f,l with η > 0. This equals the
official open_clip path (which stores ∇[−mean(1−cos)] and steps with λ < 0); the official HF paths flip it (§2.7).
The retain gradient is g_r = ∇θ of the CLIP contrastive loss L_r.

Averaging differs from the official code on purpose: the official ``calc_grad`` divides the sum of *batch-mean*
gradients by the number of batches, so a partial last batch weighs as much as a full one and the result depends on
the batch size. Here the forget gradient is the exact mean over *samples* (sum of per-sample cosine gradients / N),
identical for any batch size. The contrastive retain loss is a batch-level quantity (each sample's loss depends on
its batch-mates), so each batch's mean-loss gradient is weighted by its sample count (Σ_b B_b ∇ℓ_b / Σ_b B_b).
Accumulation is float32 whatever the model dtype.

Precision (``--precision bf16|fp16``): the adapter's forward methods (``forget_loss_per_sample``, ``retain_loss`` via
``encode_*``) run the model under ``adapter.autocast()`` themselves (:mod:`slugkit.models.base`); the weights are
float32 leaves, so autograd returns each candidate's ``.grad`` in float32 (the backward of autocast's weight cast),
the losses are float32, and the sums are float32 as in fp32 runs. Nothing here depends on the precision. Only
candidate tensors are stored (others are frozen during the
pass, which also skips e.g. the 49408-row token-embedding gradient), and an empty forget set is an error: the
official code silently saves all-zero gradients when its tar path is wrong (§2.4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..common.errors import EmptyForgetSetError
from ..common.progress import vanishing_bar


class NonFiniteGradientError(FloatingPointError):
    pass


@dataclass
class Gradients:
    forget: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor]
    n_forget: int
    n_retain: int
    seconds: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        from ..common.files import atomic_write_bytes

        tensors = {f"forget/{k}": v.contiguous() for k, v in self.forget.items()}
        tensors.update({f"retain/{k}": v.contiguous() for k, v in self.retain.items()})
        # One metadata key only: safetensors keeps __metadata__ in a hash map, so several keys would make the
        # file bytes differ from run to run.
        import json

        meta = {"slugkit": json.dumps({"format": "slugkit-gradients-1", "n_forget": self.n_forget,
                                       "n_retain": self.n_retain}, sort_keys=True)}
        atomic_write_bytes(path, save(dict(sorted(tensors.items())), metadata=meta))

    @staticmethod
    def is_file_of_ours(path: str | Path) -> bool:
        """Whether ``path`` is a gradients file slug wrote, from its header alone (a full file can be gigabytes;
        ``slug grads --overwrite`` replaces only those, trial 39)."""
        import json

        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("slugkit", "{}"))
        except Exception:
            return False
        return isinstance(meta, dict) and str(meta.get("format", "")).startswith("slugkit-gradients")

    @classmethod
    def load(cls, path: str | Path) -> "Gradients":
        """The gradients file at ``path`` (:meth:`save`, ``slug grads``). Raises ``ValueError`` naming the file when
        it is not a readable safetensors file (truncated, empty, JSON: it was safetensors' traceback) or holds no
        slugkit gradients (a LoRA file: "not enough values to unpack"; trial 39)."""
        import json

        from safetensors import safe_open

        forget, retain = {}, {}
        what = _not_a_tensor_file(Path(path))
        if what:  # said "not a readable gradients file (OSError: No such device)" / "header too large"
            raise ValueError(f"{path} is {what}, not the gradients file `slug grads` (or --save-gradients) writes (a "
                             ".safetensors file); give that file, or leave --gradients out to compute them")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                meta = json.loads(md.get("slugkit", "{}"))
                fmt = meta.get("format", "") if isinstance(meta, dict) else ""
                if not str(fmt).startswith("slugkit-gradients"):
                    kind = ("a slugkit LoRA" if "slugkit.format" in md
                            else "a slugkit patch's tensor file" if any(k.startswith(("original/", "patched/"))
                                                                       for k in f.keys())
                            else "no slugkit gradients file")
                    raise ValueError(f"{path} is {kind}, not the gradients `slug grads` (or --save-gradients) "
                                     "writes; give that file, or leave --gradients out to compute them")
                for k in f.keys():
                    split, _, name = k.partition("/")
                    if split in ("forget", "retain") and name:  # other prefixes (gradpass's ``stats/``) are not
                        (forget if split == "forget" else retain)[name] = f.get_tensor(k)
        except json.JSONDecodeError as e:  # metadata that is no JSON: a foreign file, said as one
            raise ValueError(f"{path} is no slugkit gradients file (its metadata is not JSON: {e}); recompute it "
                             "with `slug grads`") from None
        except ValueError:
            raise
        except Exception as e:  # safetensors' SafetensorError (header too small / too large / incomplete), OSError
            raise ValueError(f"{path} is not a readable gradients file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]}): truncated or another kind of file; recompute it "
                             "with `slug grads`") from None
        return cls(forget, retain, int(meta.get("n_forget", 0)), int(meta.get("n_retain", 0)))


def _not_a_tensor_file(path: Path) -> str | None:
    """What ``path`` is when it plainly holds no tensors — a folder (a patch folder or a run folder named as such), a
    JSON text file (a patch's ``patch.json``) — else None (the safetensors reader judges the rest)."""
    if path.is_dir():
        return ("a patch folder" if (path / "patch.json").is_file() else
                "a run folder" if (path / "result.json").is_file() else "a folder")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return None
    if head[:1] in (b"{", b"["):  # a safetensors file starts with its 8-byte header length, never with JSON text
        return "a patch's metadata file (patch.json)" if path.name == "patch.json" else "a JSON text file"
    return None


class candidate_grads:
    """Context manager: only ``names`` require grad inside (others are frozen); flags and ``.grad`` restored after.

    Shared by :func:`compute_gradients` and the streaming pass (:mod:`slugkit.slug.gradpass`).
    """

    def __init__(self, model, names: list[str]):
        self.model, self.names = model, list(names)
        self.params = dict(model.named_parameters())

    def __enter__(self) -> dict[str, torch.Tensor]:
        wanted = set(self.names)
        self._flags = {n: p.requires_grad for n, p in self.params.items()}
        for n, p in self.params.items():
            p.requires_grad_(n in wanted)
        return self.params

    def __exit__(self, *exc) -> None:
        self.model.zero_grad(set_to_none=True)
        for n, p in self.params.items():
            p.requires_grad_(self._flags[n])


def new_sums(params: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """float32 zero accumulators shaped like the ``names`` parameters (on their device)."""
    return {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}


def accumulate_batch(adapter, params: dict[str, torch.Tensor], names: list[str], sums: dict[str, torch.Tensor],
                     images: torch.Tensor, tokens: torch.Tensor, kind: str) -> int:
    """Add one batch's contribution to ``sums`` and return its sample count (the one copy of the loss logic).

    forget: Σ_i ∇cos_i (per-sample sum); retain: B·∇ℓ_batch (CLIP loss weighted by the batch size). ``images``
    (B×C×H×W float32) and ``tokens`` (B×L int64) may be on any device: they are moved to ``adapter.device`` here,
    right before the forward (run by the adapter under its ``autocast()``); ``sums`` (float32, shaped like the
    parameters) live on the model's device and are added to in place.
    """
    b = images.shape[0]
    if b == 0:
        return 0
    # The data may live on the CPU (it can be large); only this batch goes to the model's device (a no-op on CPU).
    device = adapter.device
    images, tokens = images.to(device), tokens.to(device)
    model = adapter.model
    model.zero_grad(set_to_none=True)
    if kind == "forget":
        loss = adapter.forget_loss_per_sample(images, tokens).sum()
    else:
        loss = adapter.retain_loss(images, tokens) * b
    # Each tensor's gradient is added to its float32 sum as soon as autograd has it and then dropped, so a
    # backward never holds a full ``.grad`` copy of the candidates next to the sums (peak: sums + one tensor).
    handles = [params[n].register_post_accumulate_grad_hook(_adder(sums[n])) for n in names]
    try:
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return b


def _adder(acc: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        acc.add_(p.grad.detach().float())
        p.grad = None

    return hook


def _accumulate(adapter, batches: Iterable, names: list[str], kind: str, progress: bool, total: int | None):
    it = batches
    if progress:
        it = vanishing_bar(batches, desc=f"gradients: {kind}", unit="batch", total=total)
    with candidate_grads(adapter.model, names) as params:
        sums = new_sums(params, names)
        count = 0
        for images, tokens in it:
            count += accumulate_batch(adapter, params, names, sums, images, tokens, kind)
    return sums, count


def check_finite(forget: dict, retain: dict) -> None:
    """Raise :class:`NonFiniteGradientError` when a gradient holds NaN/inf, or when a whole split's gradient is
    exactly zero (trust case A6: a contrastive retain loss over batches of one pair has a zero gradient; every
    alignment would be 0 and the Pareto front meaningless) — an empty edit direction is as wrong as a NaN one."""
    for split, d in (("forget", forget), ("retain", retain)):
        bad = [n for n, g in d.items() if not torch.isfinite(g).all()]
        if bad:
            raise NonFiniteGradientError(
                f"{split} gradient has NaN/inf in {len(bad)} tensor(s), e.g. {bad[0]}; check the data (a corrupt "
                "image?) and use fp32 precision (fp16 autocast can overflow; bf16 has float32's range)")
        if d and all(not bool(g.any()) for g in d.values()):
            raise NonFiniteGradientError(
                f"the {split} gradient is exactly zero in all {len(d)} candidate tensors"
                + ("; the retain loss is contrastive, so every retain batch needs at least 2 pairs (--batch-size >= 2,"
                   " and no shard with a single pair when batches are formed per shard)" if split == "retain" else
                   "; check that the forget pairs reach the model"))


def alignment_gradient(adapter, images: torch.Tensor, tokens: torch.Tensor, names: list[str],
                       batch_size: int = 64) -> dict[str, torch.Tensor]:
    """∇ mean cos(image, caption) of ``names`` over the pairs ``images`` (N x C x H x W) / ``tokens`` (N x L) — the
    forget gradient's formula (spec §1.1) on any pairs (e.g. a neighbour's, :mod:`slugkit.slug.neighbours`). CPU
    float32 tensors; raises :class:`~slugkit.common.errors.EmptyForgetSetError` for N = 0."""
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        sums, n = _accumulate(adapter, ((images[i:i + batch_size], tokens[i:i + batch_size])
                                        for i in range(0, images.shape[0], batch_size)), names, "forget", False, None)
    finally:
        adapter.model.train(was_training)
    if n == 0:
        raise EmptyForgetSetError("no pairs reached the alignment gradient")
    return _mean_to_cpu(sums, n)


def compute_gradients(adapter, forget_batches: Iterable, retain_batches: Iterable, names: list[str] | None = None,
                      *, progress: bool = True, n_forget_batches: int | None = None,
                      n_retain_batches: int | None = None) -> Gradients:
    """Mean forget gradient (∇ mean cos) and sample-weighted mean retain gradient (∇ CLIP loss) of ``names``.

    ``*_batches`` yield ``(images, tokens)`` tensors (already preprocessed / tokenized), typically on the CPU: each
    batch is moved to ``adapter.device`` just before its forward and the float32 sums accumulate there. The returned
    gradients are CPU float32 tensors whatever the model's device (with a CUDA model they are copied back once, at
    the end).
    """
    names = list(names if names is not None else adapter.candidate_names())
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        t0 = time.perf_counter()
        f_sum, n_f = _accumulate(adapter, forget_batches, names, "forget", progress, n_forget_batches)
        t1 = time.perf_counter()
        if n_f == 0:
            raise EmptyForgetSetError("the forget set is empty: no sample reached the gradient pass. A zero gradient "
                                      "would silently unlearn nothing; check the forget shards / folder.")
        forget = _mean_to_cpu(f_sum, n_f)  # off the device before the retain pass: one float32 copy there at a time
        r_sum, n_r = _accumulate(adapter, retain_batches, names, "retain", progress, n_retain_batches)
        t2 = time.perf_counter()
        if n_r == 0:
            raise ValueError("the retain set is empty: alignment with retained knowledge cannot be measured")
        retain = _mean_to_cpu(r_sum, n_r)
    finally:
        adapter.model.train(was_training)
    check_finite(forget, retain)
    return Gradients(forget, retain, n_f, n_r, {"forget": t1 - t0, "retain": t2 - t1})


def _mean_to_cpu(sums: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """``sums / n`` as CPU tensors, in place (same op and bits as ``sums[k] / n``; a CPU tensor is not copied). Each
    device tensor is released as soon as its CPU copy exists."""
    cpu = torch.device("cpu")
    for k in list(sums):
        sums[k].div_(n)
        if sums[k].device != cpu:
            sums[k] = sums[k].to(cpu)
    return sums
