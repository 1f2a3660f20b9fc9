"""The null-space SLUG step (slugkit.slug.nullspace): an edit projected onto the null space of a Linear's kept inputs
leaves the layer's outputs on those inputs unchanged, and changes them without the projection."""

import pytest
import torch

from slugkit.slug.nullspace import (
    input_projector,
    linear_inputs,
    linear_moments,
    module_of,
    null_space_gradients,
    project_gradient,
)


class Tiny(torch.nn.Module):
    def __init__(self, d=16, h=24):
        super().__init__()
        self.inp = torch.nn.Linear(d, h)
        self.mid = torch.nn.Linear(h, h)
        self.out = torch.nn.Linear(h, 4)

    def forward(self, x):  # x: [B, T, d] like token states
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def _model():
    torch.manual_seed(0)
    return Tiny().eval()


def test_projected_edit_leaves_the_kept_inputs_layer_outputs_unchanged():
    m = _model()
    kept = torch.randn(3, 5, 16)  # 15 token vectors: the exact span inside the 24-wide input of `mid`
    name = "mid.weight"
    acts = linear_inputs(m, [name], lambda: m(kept))[name]
    assert acts.shape == (15, 24)
    p, info = input_projector(acts, energy=1.0)
    assert info["rank"] == 15 and info["dim"] == 24 and abs(info["energy"] - 1.0) < 1e-9
    g = torch.randn(24, 24)
    eta = 3.0
    with torch.no_grad():
        before = m.mid(acts)
        raw = torch.nn.functional.linear(acts, m.mid.weight - eta * g, m.mid.bias)
        projected = torch.nn.functional.linear(acts, m.mid.weight - eta * project_gradient(g, p), m.mid.bias)
        # the whole model on the kept inputs: unchanged too (later layers see unchanged inputs)
        y0 = m(kept)
        m.mid.weight -= eta * project_gradient(g, p)
        y1 = m(kept)
        new = torch.randn(2, 5, 16)  # other inputs: the projected edit still acts on them
        y_new_after = m(new)
        m.mid.weight += eta * project_gradient(g, p)
        y_new_before = m(new)
    assert (raw - before).abs().max() > 1.0  # without the projection the edit moves the kept outputs
    torch.testing.assert_close(projected, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=0)
    assert (y_new_after - y_new_before).abs().max() > 1e-3


def test_energy_keeps_the_top_directions_and_rank_overrides():
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 8))[0]
    scales = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.0, 0.0])  # energies 100, 25, 4, 1, .25, .01
    coeff = torch.linalg.qr(torch.randn(200, 8))[0]  # orthonormal columns: Σ x xᵀ = basis diag(s²) basisᵀ
    acts = coeff @ torch.diag(scales) @ basis.T
    total = float((scales ** 2).sum())
    p, info = input_projector(acts, energy=0.95)  # 100+25 = 96.4% of the energy: two directions
    assert info["rank"] == 2 and abs(info["energy"] - 125 / total) < 1e-6
    torch.testing.assert_close(p, basis[:, :2] @ basis[:, :2].T, atol=1e-5, rtol=0)
    assert input_projector(acts, energy=0.99)[1]["rank"] == 3  # 129 / 130.26 = 99.03%
    assert input_projector(acts, energy=1.0)[1]["rank"] == 6  # the exact span: the two zero directions left out
    assert input_projector(acts, rank=4)[1]["rank"] == 4
    assert input_projector(acts, rank=20)[1]["rank"] == 6  # clipped to the non-zero directions
    p0, i0 = input_projector(acts, rank=0)
    assert i0["rank"] == 0 and float(p0.abs().max()) == 0.0


def test_null_space_gradients_for_a_group_and_the_refusals():
    m = _model()
    kept = torch.randn(2, 3, 16)
    names = ["inp.weight", "mid.weight"]
    grads = {n: torch.randn_like(dict(m.named_parameters())[n]) for n in names}
    saved = {n: g.clone() for n, g in grads.items()}
    proj, info = null_space_gradients(m, grads, names, lambda: m(kept), energy=1.0)
    assert all(torch.equal(grads[n], saved[n]) for n in names)  # inputs untouched
    assert info["inp.weight"]["rank"] == 6 and info["inp.weight"]["inputs"] == 6
    assert all(0.0 < info[n]["norm_ratio"] < 1.0 for n in names)
    with torch.no_grad():
        x = torch.tanh(m.inp(kept))
        torch.testing.assert_close(torch.nn.functional.linear(kept, m.inp.weight - 2.0 * proj["inp.weight"]),
                                   torch.nn.functional.linear(kept, m.inp.weight), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.nn.functional.linear(x, m.mid.weight - 2.0 * proj["mid.weight"]),
                                   torch.nn.functional.linear(x, m.mid.weight), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Linear weights only"):
        module_of(m, "mid.bias")
    with pytest.raises(ValueError, match="no module"):
        module_of(m, "nope.weight")
    with pytest.raises(RuntimeError, match="never reached"):
        linear_inputs(m, ["out.weight"], lambda: m.inp(kept))
    assert not m.out._forward_hooks  # hooks removed even when the capture fails
    with pytest.raises(ValueError, match="energy"):
        input_projector(torch.randn(3, 4), energy=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        project_gradient(torch.randn(3, 4), torch.eye(3))


def test_second_moments_give_the_projector_of_the_rows_batch_by_batch():
    """null_space_gradients accumulates Σ x xᵀ (memory in², not N x in): the same projector as from the rows."""
    m = _model()
    batches = [torch.randn(2, 5, 16), torch.randn(3, 4, 16)]
    name = "mid.weight"
    acts = linear_inputs(m, [name], lambda: [m(b) for b in batches])[name]
    moment, n = linear_moments(m, [name], lambda: [m(b) for b in batches])[name]
    assert n == 22 and moment.dtype == torch.float64
    torch.testing.assert_close(moment, acts.double().T @ acts.double(), rtol=1e-9, atol=1e-9)
    for kw in ({"energy": 0.9}, {"energy": 1.0}, {"rank": 3}):
        p_rows, i_rows = input_projector(acts, **kw)
        g = torch.randn(24, 24)
        proj, info = null_space_gradients(m, {name: g}, [name], lambda: [m(b) for b in batches], **kw)
        assert info[name]["rank"] == i_rows["rank"] and info[name]["inputs"] == 22
        torch.testing.assert_close(proj[name], project_gradient(g, p_rows), rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="never reached"):
        linear_moments(m, ["out.weight"], lambda: m.inp(batches[0]))
    assert not m.out._forward_hooks
