"""Device placement of the in-process path (`slug unlearn --device cuda`, `slug demo --device cuda`).

The data (preprocessed images, token ids) stays in CPU memory; every batch must be moved to ``adapter.device`` right
before the forward, and features / gradients / patch values must come back to the CPU.

Without a GPU this is checked with a *simulated* device, CPU only: the data is made of :class:`HostTensor` (a CPU
tensor standing for host memory; moving it with ``.to(device)`` / ``.cuda()`` gives a plain tensor, as a copy to a
GPU would) and :class:`SimDeviceAdapter` wraps a real adapter and refuses any ``HostTensor`` reaching the model (what
a CUDA model does with a CPU input: "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)").
Its encoders return :class:`DeviceTensor` (standing for GPU memory), which the evaluation must bring back to the CPU
with ``.cpu()`` / ``.to("cpu")`` before computing metrics. Everything else is the real model on the CPU, so the
results must be bit-identical to the unwrapped adapter's.

The ``cuda`` tests at the end run the same on a real GPU and are skipped without one.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import NAMES, forget_pairs, make_suite, retain_pairs, split_batches

from slugkit.eval.zeroshot import EvalSuite, ImageSet, SuiteEvaluator
from slugkit.slug.gradients import compute_gradients
from slugkit.slug.layers import rank_layers
from slugkit.slug.search import SearchConfig, edited_values, search_layers


from sim_device import HostTensor, SimDeviceAdapter, host


def host_suite(s: EvalSuite) -> EvalSuite:
    def hs(x):
        return None if x is None else ImageSet(host(x.images), x.labels)

    return EvalSuite(s.names, s.identity_templates, s.target, hs(s.forget), hs(s.related), s.utility_classnames,
                     s.utility_templates, hs(s.utility), s.targets)


def host_batches(images, tokens, bs):
    return split_batches(host(images), host(tokens), bs)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["open_clip", "hf_clip"])
def family_adapter(request):
    """The trained tiny model of each family (open_clip from conftest, transformers CLIPModel from hf_tiny)."""
    if request.param == "open_clip":
        return request.getfixturevalue("trained_adapter")
    pytest.importorskip("transformers")
    from hf_tiny import build_adapter, train

    return train(build_adapter(seed=0))


def _grads(a, batches=split_batches):
    return compute_gradients(a, batches(*forget_pairs(a.tokenize), 2), batches(*retain_pairs(a.tokenize), 4),
                             progress=False)


def _assert_cpu_grads(g):
    for d in (g.forget, g.retain):
        for n, t in d.items():
            assert type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32, n


# ---------------------------------------------------------------------------------------------- CPU-only checks
def test_sim_device_catches_unmoved_data(trained_adapter):
    """The simulation reproduces the CUDA failure: a host batch handed to the model is refused."""
    sim = SimDeviceAdapter(trained_adapter)
    imgs, toks = forget_pairs(trained_adapter.tokenize)
    with pytest.raises(RuntimeError, match="weight type"):
        sim.forget_loss_per_sample(host(imgs), host(toks))
    assert type(host(imgs).to(sim.device)) is torch.Tensor and type(host(imgs)[:2]) is HostTensor
    sim.forget_loss_per_sample(host(imgs).to(sim.device), host(toks).to(sim.device))


def test_gradient_pass_moves_each_batch_to_the_model(family_adapter):
    """compute_gradients with host data on a (simulated) device model: same bits as the plain CPU run, CPU float32."""
    a = family_adapter
    ref = _grads(a)
    got = _grads(SimDeviceAdapter(a), host_batches)
    _assert_cpu_grads(got)
    assert (got.n_forget, got.n_retain) == (ref.n_forget, ref.n_retain)
    for split in ("forget", "retain"):
        r, g = getattr(ref, split), getattr(got, split)
        assert sorted(r) == sorted(g)
        assert all(torch.equal(r[n], g[n]) for n in r), split


def test_evaluation_and_search_on_the_model_device(family_adapter):
    """SuiteEvaluator (full, naive and cached staged re-evaluation) and search_layers with host inputs: features
    come back to the CPU, and every metric and step equals the plain CPU run."""
    a = family_adapter
    grads = _grads(a)
    table = rank_layers(a, grads)
    front = table.front_names()
    ratios = {r.name: r.ratio for r in table.rows}
    cfg = SearchConfig(metric="forget_top1", steps=3)

    ev = SuiteEvaluator(a, make_suite())
    sim = SimDeviceAdapter(a)
    sev = SuiteEvaluator(sim, host_suite(make_suite()))
    for t in (sev.base_img, sev.base_txt):  # features moved back from the device
        assert type(t) is torch.Tensor and t.device.type == "cpu"
    assert torch.equal(sev.base_img, ev.base_img) and torch.equal(sev.base_txt, ev.base_txt)
    assert sev.base_metrics() == ev.base_metrics()
    assert sev.evaluate_naive() == ev.evaluate_naive()
    for name in (front[0], front[-1]):  # a vision and a language layer (fronts are per tower)
        cache = sev.prepare(name)
        assert cache["x"].shape[0] > 0
        assert sev.evaluate_cached(cache) == ev.evaluate_cached(ev.prepare(name))
    for cached in (True, False):
        ref = search_layers(a, grads, front, ratios, ev, cfg, cached=cached, progress=False)
        got = search_layers(sim, grads, front, ratios, sev, cfg, cached=cached, progress=False)
        assert [(r.name, r.step_size, [(s.step_size, s.metrics) for s in r.trajectory], r.val_metrics)
                for r in got] == \
               [(r.name, r.step_size, [(s.step_size, s.metrics) for s in r.trajectory], r.val_metrics) for r in ref]
    vals = edited_values(a.model, grads.forget, a.group_of(front[0]), 0.1 * ratios[front[0]])
    assert all(v.device.type == "cpu" for v in vals.values())


@pytest.mark.slow
def test_run_unlearn_with_host_data(tmp_path, trained_adapter):
    """`run_unlearn` end to end (folders → load_pairs → gradients → layers → cached search → test evaluation →
    patch) with a simulated device model: same result as the plain CPU run."""
    pytest.importorskip("transformers")  # _write_world's to_pil lives with the HF helpers
    from conftest import write_captioned_world as _write_world

    from slugkit.workflows.unlearn import UnlearnConfig, run_unlearn

    _write_world(tmp_path / "w")
    w = tmp_path / "w"

    def cfg(out):
        return UnlearnConfig(concept=NAMES[0], out=str(tmp_path / out), forget=str(w / "forget"),
                             retain=str(w / "retain"), val_identities=str(w / "val"), test_identities=str(w / "test"),
                             names=str(w / "names.txt"), identity_templates=["a photo of {}."], batch_size=4,
                             search=SearchConfig(metric="forget_top1", steps=4), progress=False)

    ref = run_unlearn(cfg("ref"), adapter=trained_adapter)
    got = run_unlearn(cfg("sim"), adapter=SimDeviceAdapter(trained_adapter))
    for k in ("layer", "group", "step_size", "metrics", "search", "pareto_front"):
        assert got[k] == ref[k], k
    assert (tmp_path / "sim" / "patch" / "patch.safetensors").read_bytes() == \
        (tmp_path / "ref" / "patch" / "patch.safetensors").read_bytes()


def test_cli_device_errors(monkeypatch, capsys, tmp_path):
    """Bad --device values and device RuntimeErrors end in `error: ...` (exit 2), not a traceback; other
    RuntimeErrors keep theirs."""
    import slugkit.cli as cli

    assert cli.main(["demo", "--device", "gpu", "--out", str(tmp_path / "x")]) == 2
    assert "--device gpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert cli.check_device("cpu") is None and cli.check_device(None) is None

    def boom(msg):
        def f(a):
            raise RuntimeError(msg)
        return f

    monkeypatch.setattr(cli.inspect_cmd, "cmd_inspect", boom("Input type (torch.FloatTensor) and weight type "
                                                         "(torch.cuda.FloatTensor) should be the same"))
    assert cli.main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Input type") and "device problem" in err
    monkeypatch.setattr(cli.inspect_cmd, "cmd_inspect", boom("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "--batch-size" in capsys.readouterr().err
    monkeypatch.setattr(cli.inspect_cmd, "cmd_inspect", boom("some other bug"))
    with pytest.raises(RuntimeError, match="some other bug"):
        cli.main(["inspect", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- real GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32(monkeypatch):
    """Full fp32 on the GPU (no TF32 convolutions / matmuls), so that CUDA results can be compared with the CPU's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _to_cuda(a):
    """A copy of the adapter with its model on the GPU."""
    import copy

    b = copy.copy(a)
    b.model = copy.deepcopy(a.model).to("cuda")
    b._stages = {}
    return b


@cuda
def test_cuda_gradients_evaluation_and_search(family_adapter, no_tf32):
    """CPU data, CUDA model: gradients come back as CPU float32 close to the CPU run, features to the CPU, the
    cached search's activations stay on the GPU and equal the naive search, patch values are CPU tensors."""
    a = family_adapter
    g = _to_cuda(a)
    assert g.device.type == "cuda"
    ref, got = _grads(a), _grads(g)
    _assert_cpu_grads(got)
    for split in ("forget", "retain"):
        for n, r in getattr(ref, split).items():
            err = float((getattr(got, split)[n] - r).norm() / r.norm().clamp_min(1e-12))
            assert err < 1e-4, (split, n, err)
    ev, gev = SuiteEvaluator(a, make_suite()), SuiteEvaluator(g, make_suite())
    assert gev.base_img.device.type == "cpu" and gev.base_txt.device.type == "cpu"
    assert torch.allclose(gev.base_img, ev.base_img, atol=1e-4)
    assert gev.base_metrics() == pytest.approx(ev.base_metrics(), abs=1e-6)
    table = rank_layers(g, got)
    front = table.front_names()
    ratios = {r.name: r.ratio for r in table.rows}
    cfg = SearchConfig(metric="forget_top1", steps=4)
    res = search_layers(g, got, front, ratios, gev, cfg, progress=False)
    naive = search_layers(g, got, front, ratios, gev, cfg, cached=False, progress=False)
    assert [[s.step_size for s in r.trajectory] for r in res] == [[s.step_size for s in r.trajectory] for r in naive]
    assert any(r.accepted_step is not None for r in res)
    cache = gev.prepare(front[0])
    assert cache["x"].device.type == "cuda"  # activations stay on the device
    vals = edited_values(g.model, got.forget, g.group_of(front[0]), ratios[front[0]] / 10)
    assert all(v.device.type == "cpu" for v in vals.values())
    assert all(p.device.type == "cuda" for p in g.model.parameters())


@cuda
@pytest.mark.slow
def test_cuda_slug_unlearn_hf_family(tmp_path):
    """`slug unlearn --family hf_clip --device cuda` end to end on a tiny CLIPModel folder."""
    pytest.importorskip("transformers")
    from hf_tiny import build_adapter, train
    from conftest import write_captioned_world as _write_world

    from slugkit.cli import main
    from slugkit.patch import load_patch

    train(build_adapter(seed=0)).save_pretrained(tmp_path / "clip")
    _write_world(tmp_path / "w")
    w = tmp_path / "w"
    out = tmp_path / "run"
    assert main(["unlearn", "--family", "hf_clip", "--model", str(tmp_path / "clip"), "--device", "cuda",
                 "--concept", NAMES[0], "--forget", str(w / "forget"), "--retain", str(w / "retain"), "--names",
                 str(w / "names.txt"), "--val-identities", str(w / "val"), "--test-identities", str(w / "test"),
                 "--identity-template", "a photo of {}.", "--criterion", "forget_top1", "--no-progress",
                 "--batch-size", "4", "--save-gradients", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["before"]["forget_top1"] >= 0.9 and result["metrics"]["after"]["forget_top1"] <= 0.34
    patch = load_patch(out / "patch")
    assert sorted(patch.names) == sorted(result["group"])
    assert all(t.device.type == "cpu" for t in patch.patched.values())


@cuda
@pytest.mark.slow
def test_cuda_slug_demo(tmp_path):
    """`slug demo --device cuda` end to end on the embedded open_clip model."""
    pytest.importorskip("open_clip")
    from slugkit.cli import main

    out = tmp_path / "run"
    assert main(["demo", "--device", "cuda", "--out", str(out), "--data-dir", str(tmp_path / "world"),
                 "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["before"]["forget_top5"] >= 0.9 and result["metrics"]["after"]["forget_top5"] <= 0.05
    assert (out / "patch" / "patch.safetensors").is_file()


def test_baselines_and_mia_move_each_batch_to_the_model(trained_adapter):
    """`slug compare`'s baselines (updates, SalUn's saliency, SSD's importances, SalUn-RL's mixed batches) and the
    MIA with host data on a (simulated) device model: every batch is moved, and the weights equal the CPU run's."""
    from slugkit.eval.mia import pair_cosines
    from slugkit.methods import MethodData, make_method

    class Val:  # validation is covered above; here a constant
        images, tokens = torch.zeros(1, 1), torch.zeros(1, 1)

        def evaluate_naive(self):
            return {"forget_top1": 1.0, "forget_top5": 1.0, "related_top1": 1.0, "utility_top1": 1.0}

    a = trained_adapter
    fi, ft = forget_pairs(a.tokenize)
    ri, rt = retain_pairs(a.tokenize)
    base = {k: v.clone() for k, v in a.model.state_dict().items()}
    try:
        for name in ("gaft", "salun", "salun-rl", "ssd"):
            after = []
            for adapter, place in ((a, lambda t: t), (SimDeviceAdapter(a), host)):
                a.model.load_state_dict(base)
                data = MethodData(place(fi), place(ft), place(ri), place(rt), batch_size=2)
                make_method(name, lr=1e-3, epochs=1, early_stop=False).run(adapter, data, Val())
                after.append({k: v.clone() for k, v in a.model.state_dict().items()})
            assert any(not torch.equal(after[0][k], base[k]) for k in base), name  # the method did edit
            assert all(torch.equal(after[0][k], after[1][k]) for k in base), name
        a.model.load_state_dict(base)
        assert pair_cosines(SimDeviceAdapter(a), host(fi), host(ft)) == pair_cosines(a, fi, ft)
    finally:
        a.model.load_state_dict(base)
