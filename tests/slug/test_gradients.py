"""Step 1 of SLUG: the forget and retain gradients (spec §2.2–§2.5, §10.1), checked against hand computation.

* g_f is the exact per-*sample* mean of ∇cos(f_I(x_i), f_T(t_i)) (spec §2.3 clean sign convention), hence independent
  of the batch size. The official ``calc_grad`` instead averages batch-mean gradients over batches, which weighs a
  partial last batch like a full one (spec §2.4); a test below shows that formula gives a different value here.
* g_r is Σ_b B_b ∇ℓ_b / Σ_b B_b with ℓ_b open_clip's own ``ClipLoss`` on batch b (checked against the library loss,
  not against the adapter's implementation).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import split_batches

open_clip = pytest.importorskip("open_clip")

from slugkit.data.curate import EmptyForgetSetError  # noqa: E402
from slugkit.slug.gradients import Gradients, NonFiniteGradientError, compute_gradients  # noqa: E402
from slugkit.slug.search import edited  # noqa: E402

ATOL = 1e-6


def _grads(adapter, forget, retain, bs_f=2, bs_r=4, names=None):
    return compute_gradients(adapter, split_batches(*forget, bs_f), split_batches(*retain, bs_r), names,
                             progress=False)


def _autograd(adapter, loss_fn, names):
    """∇ of ``loss_fn()`` w.r.t. ``names``, via torch.autograd.grad (model flags untouched)."""
    params = dict(adapter.model.named_parameters())
    loss = loss_fn()
    gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, gs)}


def _mean_cos(model, images, tokens):
    """mean_i cos(f_I(x_i), f_T(t_i)) on raw encoder outputs, torch's CosineSimilarity(eps=1e-6) (spec notation)."""
    return F.cosine_similarity(model.encode_image(images), model.encode_text(tokens), dim=-1, eps=1e-6).mean()


def _flat(d, names):
    return torch.cat([d[n].flatten() for n in names])


def _assert_close_dicts(got, ref, names, atol=ATOL, rtol_norm=1e-5):
    for n in names:
        assert got[n].shape == ref[n].shape, n
        assert torch.allclose(got[n], ref[n], rtol=0, atol=atol), (n, (got[n] - ref[n]).abs().max().item())
    diff = (_flat(got, names) - _flat(ref, names)).norm()
    assert diff <= rtol_norm * _flat(ref, names).norm()


# ---------------------------------------------------------------------------------------------- forget gradient
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_forget_grad_is_exact_sample_mean(adapter, forget_data, retain_data, batch_size):
    images, tokens = forget_data
    names = adapter.candidate_names()
    ref = _autograd(adapter, lambda: _mean_cos(adapter.model, images, tokens), names)
    g = _grads(adapter, forget_data, retain_data, bs_f=batch_size)
    assert g.n_forget == 5
    assert _flat(ref, names).norm() > 1e-2  # non-trivial gradient: atol 1e-6 is a real constraint
    _assert_close_dicts(g.forget, ref, names)


def test_official_batch_mean_formula_differs_with_partial_batch(adapter, forget_data, retain_data):
    """Official calc_grad: (1/N_b) Σ_b ∇ mean_b cos. With 5 samples in batches of 2 (2, 2, 1) the last sample weighs
    1/3 instead of 1/5, so the official value is not the sample mean (and depends on the batch size). slugkit
    deliberately uses the exact sample mean (batch-size invariant)."""
    images, tokens = forget_data
    names = adapter.candidate_names()
    exact = _autograd(adapter, lambda: _mean_cos(adapter.model, images, tokens), names)

    def official(bs):
        batches = split_batches(images, tokens, bs)
        out = {n: torch.zeros_like(exact[n]) for n in names}
        for im, tk in batches:
            gb = _autograd(adapter, lambda: _mean_cos(adapter.model, im, tk), names)
            for n in names:
                out[n] += gb[n]
        return {n: v / len(batches) for n, v in out.items()}

    off2, off3 = official(2), official(3)
    ref_norm = _flat(exact, names).norm()
    assert (_flat(off2, names) - _flat(exact, names)).norm() > 1e-2 * ref_norm
    assert (_flat(off2, names) - _flat(off3, names)).norm() > 1e-2 * ref_norm
    # full batches only (batch size 5 = N): the official formula and ours coincide
    _assert_close_dicts(official(5), exact, names)
    # ours is the sample mean whatever the batch size
    g2 = _grads(adapter, forget_data, retain_data, bs_f=2)
    g3 = _grads(adapter, forget_data, retain_data, bs_f=3)
    _assert_close_dicts(g2.forget, exact, names)
    _assert_close_dicts(g3.forget, g2.forget, names)


SIGN_NAMES = ["visual.proj", "text_projection", "visual.conv1.weight",
              "visual.transformer.resblocks.1.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight"]


@torch.no_grad()
def test_forget_step_decreases_mean_cos(adapter, forget_data, base_grads):
    """θ − η·g_f lowers the forget pairs' mean cosine, by ≈ η‖g_f‖² to first order (the unlearning direction)."""
    images, tokens = forget_data
    params = dict(adapter.model.named_parameters())
    c0 = _mean_cos(adapter.model, images, tokens).item()
    for name in SIGN_NAMES:
        gn2 = float((base_grads.forget[name].double() ** 2).sum())
        eta = 1e-3 * params[name].detach().norm().item() / gn2 ** 0.5  # a 0.1% relative change
        with edited(adapter.model, base_grads.forget, [name], eta):
            c_minus = _mean_cos(adapter.model, images, tokens).item()
        with edited(adapter.model, base_grads.forget, [name], -eta):
            c_plus = _mean_cos(adapter.model, images, tokens).item()
        assert c_minus < c0 < c_plus, name
        assert (c0 - c_minus) == pytest.approx(eta * gn2, rel=0.1), name


# ---------------------------------------------------------------------------------------------- retain gradient
def test_retain_grad_is_sample_weighted_mean_of_cliploss(adapter, forget_data, retain_data):
    images, tokens = retain_data
    names = adapter.candidate_names()
    model = adapter.model
    clip_loss = open_clip.loss.ClipLoss()
    batches = split_batches(images, tokens, 4)
    assert [len(b[0]) for b in batches] == [4, 3]
    per_batch = []
    for im, tk in batches:
        def loss_fn(im=im, tk=tk):
            fi = model.encode_image(im, normalize=True)
            ft = model.encode_text(tk, normalize=True)
            return clip_loss(fi, ft, model.logit_scale.exp())
        per_batch.append((len(im), _autograd(adapter, loss_fn, names)))
    total = sum(b for b, _ in per_batch)
    ref = {n: sum(b * gb[n] for b, gb in per_batch) / total for n in names}
    unweighted = {n: sum(gb[n] for _, gb in per_batch) / len(per_batch) for n in names}

    g = _grads(adapter, forget_data, retain_data, bs_r=4)
    assert g.n_retain == 7
    _assert_close_dicts(g.retain, ref, names)
    # the weighting is visible: the official unweighted batch mean is a different value here
    assert (_flat(unweighted, names) - _flat(ref, names)).norm() > 1e-3 * _flat(ref, names).norm()


def test_retain_loss_equals_open_clip_cliploss(adapter, retain_data):
    images, tokens = retain_data
    model = adapter.model
    with torch.no_grad():
        ref = open_clip.loss.ClipLoss()(model.encode_image(images, normalize=True),
                                        model.encode_text(tokens, normalize=True), model.logit_scale.exp())
        assert adapter.retain_loss(images, tokens).item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- bookkeeping
def test_only_candidates_float32_and_flags_restored(adapter, forget_data, retain_data):
    model = adapter.model
    params = dict(model.named_parameters())
    # an arbitrary pattern of flags, including a frozen candidate and a trainable non-candidate
    flags = {n: (i % 3 != 0) for i, n in enumerate(params)}
    for n, p in params.items():
        p.requires_grad_(flags[n])
    model.train()
    g = _grads(adapter, forget_data, retain_data)
    cands = adapter.candidate_names()
    assert list(g.forget) == cands and list(g.retain) == cands
    for d in (g.forget, g.retain):
        for n, t in d.items():
            assert t.dtype == torch.float32 and t.shape == params[n].shape
            assert torch.isfinite(t).all()
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert all(p.grad is None for p in params.values())
    assert model.training  # mode restored (the pass itself runs in eval mode)

    sub = ["visual.proj", "transformer.resblocks.1.ln_2.weight"]
    gs = _grads(adapter, forget_data, retain_data, names=sub)
    assert list(gs.forget) == sub and list(gs.retain) == sub
    for n in sub:  # a subset gives the same values as the full pass
        assert torch.allclose(gs.forget[n], g.forget[n], rtol=0, atol=ATOL)
        assert torch.allclose(gs.retain[n], g.retain[n], rtol=0, atol=ATOL)


def test_gradients_do_not_change_weights(adapter, forget_data, retain_data):
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    _grads(adapter, forget_data, retain_data)
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("empty", [[], iter(()), "zero-size-batch"])
def test_empty_forget_set_is_an_error(adapter, retain_data, empty):
    if empty == "zero-size-batch":
        images, tokens = retain_data
        empty = [(images[:0], tokens[:0])]
    params = dict(adapter.model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    with pytest.raises(EmptyForgetSetError):
        compute_gradients(adapter, empty, split_batches(*retain_data, 4), progress=False)
    assert {n: p.requires_grad for n, p in params.items()} == flags


def test_empty_retain_set_is_an_error(adapter, forget_data):
    with pytest.raises(ValueError, match="retain"):
        compute_gradients(adapter, split_batches(*forget_data, 2), [], progress=False)


@pytest.mark.parametrize("split", ["forget", "retain"])
def test_nan_image_raises_non_finite(adapter, forget_data, retain_data, split):
    bad = forget_data if split == "forget" else retain_data
    images = bad[0].clone()
    images[1, 0, 3, 3] = float("nan")
    bad = (images, bad[1])
    f, r = (bad, retain_data) if split == "forget" else (forget_data, bad)
    with pytest.raises(NonFiniteGradientError, match=split):
        _grads(adapter, f, r)


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_stable_bytes(tmp_path, base_grads):
    g = base_grads
    p1, p2, p3 = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    g.save(p1)
    g.save(p2)
    assert p1.read_bytes() == p2.read_bytes()
    h = Gradients.load(p1)
    assert (h.n_forget, h.n_retain) == (5, 7)
    for a, b in ((g.forget, h.forget), (g.retain, h.retain)):
        assert sorted(a) == sorted(b)
        for n in a:
            assert b[n].dtype == torch.float32 and torch.equal(a[n], b[n]), n
    h.save(p3)
    assert p3.read_bytes() == p1.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file behind


# ---------------------------------------------------------------------------------------------- --precision (E3)
@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_slug_grads_bf16_every_family(tmp_path, family):
    """`slug grads --precision bf16` runs for each family: float32 gradients close to the fp32 run's (the forward ran
    under bf16 autocast, so they are not identical), the same sample counts."""
    import json

    import numpy as np
    from PIL import Image

    from conftest import TINY_CFG
    from slugkit.cli import main
    from slugkit.data.shards import write_shard

    if family == "hf_clip":
        pytest.importorskip("transformers")
        from hf_tiny import HF_CFG

        from slugkit.models.hf_clip import HFClipAdapter

        HFClipAdapter.from_config(HF_CFG, seed=0).save_pretrained(tmp_path / "model")
    else:
        from safetensors.torch import save_file

        from slugkit.models.open_clip import OpenClipAdapter

        (tmp_path / "model").mkdir()
        net = OpenClipAdapter.from_config(TINY_CFG, seed=0).model
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  str(tmp_path / "model" / "open_clip_model.safetensors"))
        (tmp_path / "model" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    rng = np.random.default_rng(0)

    def img():
        return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))

    write_shard(tmp_path / "forget.tar", [(f"f{k}", img(), f"a photo of alice abbott {k}", "png") for k in range(5)])
    write_shard(tmp_path / "retain.tar", [(f"r{k}", img(), f"a photo of thing {k}", "png") for k in range(6)])
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = tmp_path / f"{precision}.safetensors"
        rc = main(["grads", "--family", family, "--model", str(tmp_path / "model"), "--forget",
                   str(tmp_path / "forget.tar"), "--retain", str(tmp_path / "retain.tar"), "--out",
                   str(out[precision]), "--batch-size", "3", "--precision", precision, "--no-progress"])
        assert rc == 0
    ref, got = Gradients.load(out["fp32"]), Gradients.load(out["bf16"])
    assert (got.n_forget, got.n_retain) == (ref.n_forget, ref.n_retain) == (5, 6)
    assert sorted(got.forget) == sorted(ref.forget) == sorted(got.retain) and got.forget  # same candidates

    def cos(x, y):
        return F.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()

    rel_f, cos_r, d_align = [], [], []
    for n in ref.forget:
        assert got.forget[n].dtype == got.retain[n].dtype == torch.float32
        rel_f.append(((got.forget[n] - ref.forget[n]).norm() / ref.forget[n].norm()).item())
        cos_r.append(cos(got.retain[n], ref.retain[n]))
        d_align.append(abs(abs(cos(got.forget[n], got.retain[n])) - abs(cos(ref.forget[n], ref.retain[n]))))
    # Measured (both families): forget relative error <= 1.4 %; the retain gradient of this random model on random
    # images is a small difference of large terms, so bf16 moves it more (relative error up to 14 %, cosine with the
    # fp32 one >= 0.990); the alignment |cos(g_f, g_r)| the layer choice uses moves by <= 0.017.
    assert 1e-6 < max(rel_f) <= 0.06, max(rel_f)
    assert min(cos_r) >= 0.97, min(cos_r)
    assert max(d_align) <= 0.05, max(d_align)


def test_a_zero_retain_gradient_is_an_error_like_nan():
    """Trust case A6: contrastive retain batches of one pair give a zero retain gradient; every alignment would be 0
    and the Pareto front meaningless. It is refused like a NaN gradient."""
    from slugkit.slug.gradients import NonFiniteGradientError, check_finite

    f = {"w": torch.ones(3)}
    with pytest.raises(NonFiniteGradientError, match="retain gradient is exactly zero.*at least 2 pairs"):
        check_finite(f, {"w": torch.zeros(3), "v": torch.zeros(2)})
    check_finite(f, {"w": torch.zeros(3), "v": torch.ones(2)})  # one tensor zero is fine
