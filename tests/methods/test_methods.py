"""Invariants of the baseline methods (FT, GA, GA+FT, SalUn, SSD) on tiny models and synthetic batches."""

import math

import pytest
import torch

from conftest import forget_pairs, retain_pairs
from slugkit.methods import METHODS, MethodData, make_method, saliency_mask, select_epoch
from slugkit.methods.base import (IMPORTANCE_BATCH_SIZE, LOGIT_SCALE_MAX, clamp_logit_scale, cosine_lr, forget_loss,
                                  make_optimizer, param_groups)
from slugkit.methods.salun import mask_size
from slugkit.methods.ssd import SSD, dampen, importances


class FakeEval:
    """Stands in for a SuiteEvaluator: returns scripted validation metrics (or a constant)."""

    def __init__(self, fa1=None):
        self.fa1 = list(fa1) if fa1 is not None else None
        self.calls = 0
        self.images = torch.zeros(3, 1)
        self.tokens = torch.zeros(2, 1)

    def evaluate_naive(self):
        v = self.fa1[min(self.calls, len(self.fa1) - 1)] if self.fa1 is not None else 1.0
        self.calls += 1
        return {"forget_top1": v, "forget_top5": v, "related_top1": 1.0, "utility_top1": 1.0, "utility_top5": 1.0}


def _data(a, bs=2):
    fi, ft = forget_pairs(a.tokenizer)
    ri, rt = retain_pairs(a.tokenizer)
    return MethodData(fi, ft, ri, rt, batch_size=bs, seed=0)


def _importances(a, data, bs=IMPORTANCE_BATCH_SIZE, loss="split"):
    """SSD's imp_f, imp_r computed independently: squared batch gradients at batch ``bs`` (spec: 16)."""
    clip = lambda m, x, y: m.retain_loss(x, y)  # noqa: E731
    f_loss, r_loss = (clip if loss == "clip" else forget_loss), (forget_loss if loss == "cos" else clip)
    return (importances(a, data.batches("forget", 0, shuffle=False, batch_size=bs), f_loss),
            importances(a, data.batches("retain", 0, shuffle=False, batch_size=bs), r_loss))


def _mean_cos(a, data):
    with torch.no_grad():
        return float(forget_loss(a, data.forget_images, data.forget_tokens))


# ----------------------------------------------------------------------------------------------- shared pieces
def test_registry_and_unknown():
    assert {"ft", "ga", "gaft", "salun", "salun-rl", "ssd", "ssd-cumulative"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope")
    assert make_method("salun-rl").update == "rl"
    assert make_method("ssd-cumulative").cumulative and len(make_method("ssd-cumulative").lambdas) == 10


def test_select_epoch_rule():
    ep = lambda *v: [{"val": {"forget_top1": x}} for x in v]  # noqa: E731
    assert select_epoch(ep(0.5, 0.0, 0.0, 0.2)) == 1  # first epoch with FA@1 = 0
    assert select_epoch(ep(0.5, 0.1, 0.3, 0.1)) == 1  # else the first minimum
    assert select_epoch(ep(0.0)) == 0
    assert select_epoch([]) is None
    assert select_epoch([{"val": {"forget_top1": 1, "forget_top5": 0}}], "forget_top5") == 0


def test_param_groups_cosine_and_clamp(adapter):
    groups = param_groups(adapter.model, 0.1)
    names = {id(p): n for n, p in adapter.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]["params"]}
    decay = {names[id(p)] for p in groups[1]["params"]}
    assert "logit_scale" in no_decay and "visual.conv1.weight" in decay
    assert all(p.ndim >= 2 for p in groups[1]["params"])
    assert not any(("ln" in n or "bias" in n) for n in decay)
    assert len(no_decay) + len(decay) == len(list(adapter.model.parameters()))
    opt = make_optimizer(adapter.model, 1e-3, 0.1)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert cosine_lr(1.0, 0, 10) == 1.0 and cosine_lr(1.0, 5, 10) == pytest.approx(0.5)
    with torch.no_grad():
        adapter.model.logit_scale.fill_(10.0)
    clamp_logit_scale(adapter.model)
    assert float(adapter.model.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_MAX)


# ----------------------------------------------------------------------------------------------- GA / FT / GA+FT
def test_ga_increases_forget_loss(adapter):
    data = _data(adapter)
    before = _mean_cos(adapter, data)
    res = make_method("ga", lr=1e-3, epochs=2, early_stop=False).run(adapter, data, FakeEval())
    after = _mean_cos(adapter, data)
    assert after < before - 0.05  # ascent on 1 − cos = descent on mean cos
    assert res.passes.backward_batches == 2 * 3 and res.passes.optimizer_steps == 6
    assert len(res.epochs) == 2 and res.epochs[0]["forget_loss"] > res.epochs[1]["forget_loss"]


def test_gaft_order_and_early_stop(adapter):
    data = _data(adapter)
    ev = FakeEval([0.5, 0.0, 0.0])
    res = make_method("gaft", lr=1e-4, epochs=5).run(adapter, data, ev)
    assert res.selected_epoch == 2 and len(res.epochs) == 2 and ev.calls == 2  # stops at the selected epoch
    assert res.passes.backward_batches == 2 * (3 + 4)
    assert {"forget_loss", "retain_loss"} <= set(res.epochs[0])


def test_iterative_restores_selected_epoch(adapter):
    data = _data(adapter)
    weights = []

    class RecordingEval(FakeEval):
        def evaluate_naive(self):
            weights.append(adapter.model.visual.conv1.weight.detach().clone())
            return super().evaluate_naive()

    res = make_method("ga", lr=1e-3, epochs=3).run(adapter, data, RecordingEval([0.4, 0.2, 0.3]))
    assert res.selected_epoch == 2
    assert torch.equal(adapter.model.visual.conv1.weight, weights[1])


@pytest.mark.slow
def test_ft_keeps_forget_accuracy_on_embedded():
    """A short FT on the embedded model leaves the concept recognised (FT does not forget)."""
    from slugkit.world import render as world
    from slugkit.eval.zeroshot import EvalSuite, ImageSet, SuiteEvaluator
    from slugkit.models import load_adapter

    torch.set_num_threads(1)
    a = load_adapter("embedded")
    prep = lambda ss: torch.stack([a.preprocess(s.image) for s in ss])  # noqa: E731
    forget = world.make_samples("pool", "identity", 10, classes=[0])
    retain = world.make_samples("pool", "identity", 2, classes=range(1, 41)) + \
        world.make_samples("pool", "utility", 1, classes=range(20))
    test = world.make_samples("test", "identity", 10, classes=[0])
    suite = EvalSuite(names=world.identity_names(), identity_templates=list(world.IDENTITY_EVAL_TEMPLATES), target=0,
                      forget=ImageSet(prep(test), torch.zeros(len(test), dtype=torch.long)))
    ev = SuiteEvaluator(a, suite)
    assert ev.base_metrics()["forget_top1"] >= 0.9
    data = MethodData(prep(forget), a.tokenize([s.caption for s in forget]), prep(retain),
                      a.tokenize([s.caption for s in retain]), batch_size=32)
    res = make_method("ft", epochs=2).run(a, data, ev)
    assert [e["val"]["forget_top1"] for e in res.epochs] and all(e["val"]["forget_top1"] >= 0.9 for e in res.epochs)
    assert ev.evaluate_naive()["forget_top5"] >= 0.9


# ----------------------------------------------------------------------------------------------- SalUn
@pytest.mark.parametrize("f", [0.0, 0.1, 0.5, 0.37, 1.0])
def test_saliency_mask_exact_count(f):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(7, 5, generator=g), "b": torch.rand(13, generator=g),
              "c": torch.zeros(4)}  # ties at 0
    n = sum(v.numel() for v in scores.values())
    m = saliency_mask(scores, f)
    assert sum(int(v.sum()) for v in m.values()) == math.floor(f * n)
    assert all(m[k].shape == scores[k].shape and m[k].dtype == torch.bool for k in scores)
    if 0 < f < 1:  # every selected score >= every unselected one
        sel = torch.cat([scores[k][m[k]] for k in scores])
        uns = torch.cat([scores[k][~m[k]] for k in scores])
        assert sel.min() >= uns.max()


def test_saliency_mask_ties_deterministic():
    scores = {"a": torch.ones(6), "b": torch.ones(4)}
    m = saliency_mask(scores, 0.5)
    assert m["a"].tolist() == [True] * 5 + [False] and not m["b"].any()  # lower flat index first


@pytest.mark.parametrize("update", ["gaft", "rl"])
def test_salun_masked_out_weights_bit_identical(adapter, update):
    data = _data(adapter)
    base = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    m = make_method("salun", lr=1e-3, epochs=2, update=update, early_stop=False)
    res = m.run(adapter, data, FakeEval())
    n_total = sum(p.numel() for p in base.values())
    assert res.info["mask"]["ones"] == math.floor(0.5 * n_total) and res.info["mask"]["total"] == n_total
    moved_in = 0
    for n, p in adapter.model.named_parameters():
        mask = m.mask[n]
        assert torch.equal(p.detach()[~mask], base[n][~mask]), n  # weight decay and moments do not leak
        moved_in += int((p.detach()[mask] != base[n][mask]).sum())
    assert moved_in > 0.5 * res.info["mask"]["ones"]  # the salient half does train


def test_mask_size_is_the_exact_floor():
    assert mask_size(0.29, 100) == 29 and int(0.29 * 100) == 28  # the float product would lose one
    assert mask_size(0.5, 7) == 3 and mask_size(1.0, 5) == 5 and mask_size(0.0, 5) == 0
    m = saliency_mask({"a": torch.arange(100.0)}, 0.29)
    assert int(m["a"].sum()) == 29 and m["a"][71:].all()


def test_salun_rl_two_pass_pairs_forget_images_with_retain_captions(adapter):
    data = _data(adapter)
    m = make_method("salun-rl", rl_batches="two-pass")
    assert m.passes == ("forget", "retain")
    batches = m._epoch_batches(data, "forget", 0)
    retain_rows = {tuple(t.tolist()) for t in data.retain_tokens}
    assert all(tuple(t.tolist()) in retain_rows for _, toks in batches for t in toks)
    assert sum(len(x) for x, _ in batches) == data.forget_images.shape[0]


def _rows(x):
    return [tuple(v.reshape(-1)[:8].tolist()) for v in x]


@pytest.mark.parametrize("fraction", [None, 0.5])
def test_salun_rl_mixed_batches(adapter, fraction):
    """Spec §2.4-ii: relabelled forget pairs and retain pairs in the same batches; every relabelled pair once per
    epoch, the schedule length equal to the batches actually run."""
    data = _data(adapter, bs=4)
    m = make_method("salun-rl", rl_forget_fraction=fraction)
    assert m.passes == ("mixed",) and m.rl_batches == "mixed"
    batches = m._epoch_batches(data, "mixed", 0)
    assert len(batches) == m._n_batches(data, "mixed")
    f_rows, r_rows = set(_rows(data.forget_images)), _rows(data.retain_images)
    retain_caps = {tuple(t.tolist()) for t in data.retain_tokens}
    seen_f, seen_r, mixed = [], [], 0
    for imgs, toks in batches:
        kinds = ["f" if r in f_rows else "r" for r in _rows(imgs)]
        mixed += len(set(kinds)) == 2
        seen_f += [r for r, k in zip(_rows(imgs), kinds) if k == "f"]
        seen_r += [r for r, k in zip(_rows(imgs), kinds) if k == "r"]
        assert all(tuple(t.tolist()) in retain_caps for t in toks)  # forget images carry retain captions only
        if fraction is not None:
            assert kinds.count("r") == 2 and kinds.count("f") in (1, 2)
    assert sorted(seen_f) == sorted(f_rows) and mixed >= 1
    if fraction is None:  # one pass over the union: every retain pair exactly once
        assert sorted(seen_r) == sorted(r_rows) and len(batches) == -(-(5 + 7) // 4)
    else:  # 2 relabelled + 2 retain per batch until the 5 forget pairs are used
        assert len(batches) == 3 and [len(x) for x, _ in batches] == [4, 4, 3]
    assert _rows(m._epoch_batches(data, "mixed", 0)[0][0]) == _rows(batches[0][0])  # seeded
    assert _rows(m._epoch_batches(data, "mixed", 1)[0][0]) != _rows(batches[0][0])  # reshuffled per epoch
    with pytest.raises(ValueError, match="forget fraction"):
        make_method("salun-rl", rl_forget_fraction=0.0)


def test_salun_saliency_batch_and_forget_loss_options(adapter):
    from slugkit.methods.salun import forget_gradient

    data = _data(adapter)
    m = make_method("salun", lr=1e-3, epochs=1, early_stop=False)
    res = m.run(adapter, data, FakeEval())
    assert m.importance_batch_size == IMPORTANCE_BATCH_SIZE == 16
    # the saliency pass is one batch of 16 (5 pairs), then one epoch of 3 + 4 update batches of 2
    assert res.passes.backward_batches == 1 + 3 + 4
    g16, g2 = forget_gradient(adapter, data, batch_size=16), forget_gradient(adapter, data, batch_size=2)
    assert not torch.allclose(g16["visual.conv1.weight"], g2["visual.conv1.weight"])  # mean of batch means
    with pytest.raises(ValueError, match="forget loss"):
        make_method("ga", forget_loss="nope")


def test_ga_clip_forget_loss_ascends_the_clip_loss(adapter):
    """``forget_loss="clip"`` (the repo's ``_o``): GA raises the CLIP contrastive loss on the forget pairs."""
    data = _data(adapter)

    def clip_loss():
        with torch.no_grad():
            return float(adapter.retain_loss(data.forget_images, data.forget_tokens))

    before = clip_loss()
    make_method("ga", lr=1e-3, epochs=2, early_stop=False, forget_loss="clip").run(adapter, data, FakeEval())
    assert clip_loss() > before + 1e-3


def test_masking_gradients_alone_leaks_under_adamw(adapter):
    """Why the restore is needed: AdamW's decoupled weight decay moves weights whose gradient is masked to 0."""
    p = adapter.model.visual.conv1.weight
    before = p.detach().clone()
    opt = make_optimizer(adapter.model, 1e-2, 0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before)


# ----------------------------------------------------------------------------------------------- SSD
def test_dampen_changes_iff_selected_by_the_right_factor():
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(0)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    imp_f = {"weight": torch.rand(3, 4) + 0.01, "bias": torch.rand(3) + 0.01}
    imp_r = {"weight": torch.rand(3, 4) * 0.05, "bias": torch.full((3,), 1.0)}
    imp_r["weight"][0, 0] = imp_f["weight"][0, 0] / 10  # exactly α·imp_r: not selected (strict >)
    dampen(model, imp_f, imp_r, alpha=10.0, lam=1.0)
    sel = imp_f["weight"] > 10.0 * imp_r["weight"]
    assert not sel[0, 0]
    beta = torch.clamp(imp_r["weight"] / imp_f["weight"], max=1.0)
    assert torch.equal(model.weight.detach()[~sel], w0[~sel])
    assert torch.allclose(model.weight.detach()[sel], w0[sel] * beta[sel])
    assert torch.all(model.weight.detach().abs() <= w0.abs())
    assert torch.equal(model.bias.detach(), b0)  # imp_f < α·imp_r everywhere
    m2 = torch.nn.Linear(4, 3)
    m2.load_state_dict({"weight": w0, "bias": b0})
    dampen(m2, imp_f, imp_r, alpha=float("inf"))  # α = ∞ is the identity
    assert torch.equal(m2.weight.detach(), w0)


@pytest.mark.parametrize("loss", ["split", "clip", "cos"])
def test_ssd_run_matches_formula_and_skips_scalars(adapter, loss):
    data = _data(adapter)
    base = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    imp_f, imp_r = _importances(adapter, data, loss=loss)
    res = SSD(alpha=10.0, importance_loss=loss).run(adapter, data, FakeEval())
    assert res.selected_epoch == 1 and res.epochs[0]["lambda"] == 1.0
    assert res.passes.backward_batches == 1 + 1  # 5 forget and 7 retain pairs in batches of 16 (calc_grad's)
    n_sel = 0
    for n, p in adapter.model.named_parameters():
        if p.numel() <= 1:
            assert torch.equal(p.detach(), base[n]), n
            continue
        sel = imp_f[n] > 10.0 * imp_r[n]
        n_sel += int(sel.sum())
        assert torch.equal(p.detach()[~sel], base[n][~sel]), n
        beta = torch.clamp(imp_r[n] / imp_f[n], max=1.0)
        assert torch.allclose(p.detach()[sel], base[n][sel] * beta[sel]), n
    assert n_sel == res.epochs[0]["selected_positions"] > 0


def test_ssd_importance_batch_size_and_loss_options(adapter):
    data = _data(adapter)
    ev = FakeEval()
    small = SSD(alpha=10.0, importance_batch_size=2).run(adapter, data, ev)
    assert small.passes.backward_batches == 3 + 4 and small.config["importance_batch_size"] == 2
    imp16, imp2 = _importances(adapter, data), _importances(adapter, data, bs=2)
    assert not torch.allclose(imp16[0]["visual.conv1.weight"], imp2[0]["visual.conv1.weight"])  # it matters
    with pytest.raises(ValueError, match="importance loss"):
        SSD(importance_loss="nope")
    with pytest.raises(ValueError, match="batch size"):
        SSD(importance_batch_size=0)


def test_ssd_cumulative_compounds_and_default_restarts(adapter):
    data = _data(adapter)
    base = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    imp_f, imp_r = _importances(adapter, data)
    name = "visual.conv1.weight"
    sel = imp_f[name] > 10.0 * imp_r[name]
    beta = torch.clamp(0.5 * imp_r[name] / imp_f[name], max=1.0)
    assert sel.any()
    res = SSD(lambdas=(0.5, 0.5), cumulative=True).run(adapter, data, FakeEval([0.5, 0.1]))
    assert res.selected_epoch == 2 and len(res.epochs) == 2
    w = dict(adapter.model.named_parameters())[name].detach()
    assert torch.allclose(w[sel], base[name][sel] * beta[sel] ** 2)  # applied twice
    adapter.model.load_state_dict({**adapter.model.state_dict(), **base})
    res = SSD(lambdas=(0.5, 0.5)).run(adapter, data, FakeEval([0.5, 0.1]))
    w = dict(adapter.model.named_parameters())[name].detach()
    assert torch.allclose(w[sel], base[name][sel] * beta[sel])  # each λ from the pristine weights


# ----------------------------------------------------------------------------------------------- selection / sweeps
def test_select_epoch_fa5_breaks_ties_by_fa1():
    ep = lambda *v: [{"val": {"forget_top1": a, "forget_top5": b}} for a, b in v]  # noqa: E731
    assert select_epoch(ep((0.9, 1.0), (0.2, 1.0), (0.4, 1.0)), "forget_top5") == 1  # FA@5 stuck at 1: best FA@1
    assert select_epoch(ep((0.0, 0.3), (0.0, 0.0), (0.0, 0.0)), "forget_top5") == 1  # first FA@5 = 0
    assert select_epoch(ep((0.0, 0.3), (0.0, 0.0)), "forget_top1") == 0  # the paper's rule stops earlier


class SweepEval(FakeEval):
    """Scripted FA per validation call, recording the weights at each call."""

    def __init__(self, adapter, fa):
        super().__init__(fa)
        self.adapter, self.weights = adapter, []

    def evaluate_naive(self):
        self.weights.append(self.adapter.model.visual.conv1.weight.detach().clone())
        return super().evaluate_naive()


def test_lr_sweep_keeps_smallest_rate_meeting_the_rule(adapter):
    from slugkit.methods import LRSweep

    data = _data(adapter)
    w0 = adapter.model.visual.conv1.weight.detach().clone()
    ev = SweepEval(adapter, [0.5, 0.4, 0.3, 0.0, 0.0])  # lr 1e-4: 2 epochs, no; lr 1e-3: epoch 2 meets; 1e-2 unused
    made = []

    def factory(lr):  # records the weights each run starts from
        made.append((lr, adapter.model.visual.conv1.weight.detach().clone()))
        return make_method("ga", lr=lr, epochs=2, select_metric="forget_top5")

    res = LRSweep(factory, (1e-2, 1e-4, 1e-3), select_metric="forget_top5").run(adapter, data, ev)
    assert ev.calls == 4 and [lr for lr, _ in made[1:]] == [1e-4, 1e-3]  # ascending; stops at the first that meets
    assert all(torch.equal(w, w0) for _, w in made)  # every run starts from the same weights
    assert res.config["lr"] == 1e-3 and res.selected_epoch == 2 and len(res.epochs) == 2
    assert [r["met"] for r in res.info["lr_sweep"]] == [False, True]
    assert res.passes.optimizer_steps == 2 * 2 * 3  # both runs' steps count (3 forget batches per epoch)
    assert set(res.timing_s) >= {"update", "validation"}
    assert torch.equal(adapter.model.visual.conv1.weight, ev.weights[3])


def test_lr_sweep_restores_the_best_run_when_none_meets(adapter):
    from slugkit.methods import LRSweep

    data = _data(adapter)
    ev = SweepEval(adapter, [0.3, 0.2, 0.6, 0.5])
    res = LRSweep(lambda lr: make_method("ga", lr=lr, epochs=2), (1e-4, 1e-3)).run(adapter, data, ev)
    assert ev.calls == 4 and res.config["lr"] == 1e-4 and res.selected_epoch == 2
    assert torch.equal(adapter.model.visual.conv1.weight, ev.weights[1])  # the 1e-4 run's epoch 2, restored


def test_ssd_grid_stops_at_the_first_point_meeting_the_rule(adapter):
    data = _data(adapter)
    base = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    imp_f, imp_r = _importances(adapter, data)
    ev = FakeEval([0.5, 0.4, 0.0, 0.0])
    res = SSD(alphas=(10.0, 5.0), lambdas=(1.0, 0.5), select_metric="forget_top5").run(adapter, data, ev)
    assert ev.calls == 3 and res.selected_epoch == 3
    assert (res.epochs[2]["alpha"], res.epochs[2]["lambda"]) == (5.0, 1.0)
    name = "visual.conv1.weight"
    sel = imp_f[name] > 5.0 * imp_r[name]
    beta = torch.clamp(imp_r[name] / imp_f[name], max=1.0)
    w = dict(adapter.model.named_parameters())[name].detach()
    assert torch.allclose(w[sel], base[name][sel] * beta[sel]) and torch.equal(w[~sel], base[name][~sel])
    with pytest.raises(ValueError):
        SSD(alphas=(1.0,), cumulative=True)
