"""The neighbour-protected step (issue 12, :mod:`slugkit.slug.neighbours`): the projected forget gradient is orthogonal
to every neighbour's alignment gradient, so a small edit leaves each neighbour's mean image–caption alignment
unchanged to first order while the target's still drops."""

import pytest
import torch
import torch.nn.functional as F

from slugkit.slug.gradients import alignment_gradient
from slugkit.slug.neighbours import neighbour_pairs, project_off, protect_neighbours
from slugkit.slug.search import edited

from conftest import class_images


def test_project_off_is_orthogonal_per_group_and_leaves_other_tensors():
    g = torch.Generator().manual_seed(0)
    forget = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "c": torch.randn(2, generator=g)}
    basis = [{k: torch.randn(v.shape, generator=g) for k, v in forget.items()} for _ in range(3)]
    basis.append({k: 2 * basis[0][k] - basis[1][k] for k in forget})  # linearly dependent: rank stays 3
    out, info = project_off(forget, basis, [["a", "b"]])
    p = torch.cat([out["a"].flatten(), out["b"].flatten()]).double()
    for b in basis:
        assert float(p @ torch.cat([b["a"].flatten(), b["b"].flatten()]).double()) == pytest.approx(0, abs=1e-5)
    assert out["c"] is forget["c"]
    assert info["a"]["rank"] == 3 and 0 < info["a"]["removed"] < 1
    same, info = project_off(forget, [], [["a"]])
    assert torch.equal(same["a"], forget["a"]) and info["a"]["rank"] == 0


def test_neighbour_pairs_match_whole_names_and_skip_the_rare():
    caps = ["Ann Lee at home", "ann lee.", "a photo of ANN LEE", "Annabel Leesworth", "bo ray", "Bo Ray smiling"]
    by, used, skipped = neighbour_pairs(caps, [("Ann Lee", 0.9), ("Bo Ray", 0.5)], min_pairs=3)
    assert by == {"Ann Lee": [0, 1, 2]}
    assert used == [{"concept": "Ann Lee", "similarity": 0.9, "pairs": 3}]
    assert skipped == [{"concept": "Bo Ray", "similarity": 0.5, "pairs": 2}]


def _mean_cos(adapter, images, tokens):
    with torch.no_grad():
        return float(F.cosine_similarity(adapter.encode_image(images), adapter.encode_text(tokens)).mean())


def test_projected_edit_keeps_the_neighbours_alignment_to_first_order(trained_adapter, forget_data):
    a = trained_adapter
    tok = a.tokenizer
    group = ["visual.proj"]
    nb_caps = ["bruno baker.", "a photo of bruno baker.", "bruno baker at work", "bruno baker smiling"]
    nb_img, nb_tok = class_images(1, 4, seed=41), tok(nb_caps)
    f_img, f_tok = forget_data
    g_f = alignment_gradient(a, f_img, f_tok, group)
    images = torch.cat([nb_img, class_images(5, 3, seed=42)])
    tokens = torch.cat([nb_tok, tok(["felix ford."] * 3)])
    caps = nb_caps + ["felix ford."] * 3
    projected, rec = protect_neighbours(a, g_f, images, tokens, caps, [("bruno baker", 0.9), ("felix ford", 0.8)],
                                        [group], k=2)
    assert [n["concept"] for n in rec.neighbours] == ["bruno baker", "felix ford"]
    g_n = alignment_gradient(a, nb_img, nb_tok, group)["visual.proj"]
    assert float((projected["visual.proj"] * g_n).sum()) == pytest.approx(0, abs=1e-6 * float(g_n.norm() ** 2))
    base_n, base_f = _mean_cos(a, nb_img, nb_tok), _mean_cos(a, f_img, f_tok)
    eta = 1e-2 * float(a.model.visual.proj.detach().norm() / g_f["visual.proj"].norm())
    with edited(a.model, g_f, group, eta):
        plain_n = _mean_cos(a, nb_img, nb_tok) - base_n
    with edited(a.model, projected, group, eta):
        prot_n, prot_f = _mean_cos(a, nb_img, nb_tok) - base_n, _mean_cos(a, f_img, f_tok) - base_f
    assert abs(prot_n) < 0.05 * abs(plain_n)  # first-order change removed: what is left is O(η²)
    assert prot_f < 0  # the target's alignment still drops
    same, rec0 = protect_neighbours(a, g_f, images, tokens, caps, [("bruno baker", 0.9)], [group], k=0)
    assert same is g_f and rec0.k == 0
