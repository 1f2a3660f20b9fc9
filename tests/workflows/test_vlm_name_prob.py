"""The VLM step search's margin on the target (``--vlm-name-prob``, issue 14): a validation image counts as still
naming the target when the VLM gives the name probability >= P, even when its greedy answer is another.

Constructed case, on the embedded CLIP's vision tower with a stand-in VLM (a copy of the CLIP): the answers stop
naming the target once one attention projection has moved by a relative 0.2, while the name's probability falls as
1 − a/0.4. The search without the margin accepts a ≈ 0.2; with P = 0.1 it needs a ≥ 0.36; with the probability never
below P, it refuses and says what it counted.
"""

import copy
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from slugkit.slug.search import LayerSearch, SearchFailed  # noqa: E402

LAYER = "vision_model.encoder.layers.1.self_attn.out_proj.weight"


@pytest.fixture(scope="module")
def embedded():
    from slugkit.workflows.sd_demo import embedded_hf_adapter

    return embedded_hf_adapter()


def _run(ad, monkeypatch, name_prob, floor=0.0):
    from slugkit.workflows import rounds, vlm_demo
    from slugkit.world import render as world

    target = world.IDENTITIES[0].name
    llava = copy.deepcopy(ad.model)
    base = dict(llava.named_parameters())[LAYER].detach().clone()

    def moved():
        p = dict(llava.named_parameters())[LAYER].detach()
        return float(torch.linalg.vector_norm(p - base) / torch.linalg.vector_norm(base))

    def scores(llava_, processor, named, util=None, answers=False, **kw):
        said = {n: [n if (n != target or moved() < 0.2) else "Someone Else"] * len(ims) for n, ims in named.items()}
        out = {"named": {n: float(a[0] == n) for n, a in said.items()}, "utility_accuracy": 1.0}
        return {**out, "answers": {"name": said}} if answers else out

    def probability(llava_, processor, images, name):
        assert name == target
        return [max(floor, 1.0 - moved() / 0.4)] * len(images)

    monkeypatch.setattr(vlm_demo.vlm, "vlm_scores", scores)
    monkeypatch.setattr(vlm_demo, "name_probability", probability)
    monkeypatch.setattr(rounds, "SuiteEvaluator", lambda *a, **k: None)
    params = dict(ad.model.named_parameters())
    grads = SimpleNamespace(forget={LAYER: params[LAYER].detach().clone()})  # θ − η·θ: a relative change of η
    layer = LayerSearch(name=LAYER, group=[LAYER], tower="vision", ratio=1.0, step_size=0.1, val_metrics={})
    stages = {"gradients": lambda *a: (grads, None), "layers": lambda *a: None,
              "protect": lambda cfg, adapter, g, table, data: (g, None, None), "search": lambda *a: []}
    choose = vlm_demo.vlm_chooser([target], llava, None, {n: n for n in params}, [], val_images=2, val_other=1,
                                  val_neighbour=1, val_utility=1, search_steps=8, margin=1.0, progress=False,
                                  max_layers=1, name_prob=name_prob)
    cfg = SimpleNamespace(max_layers=1, search=SimpleNamespace(selection="min"), eval_batch_size=8, progress=False)
    return rounds.generator_rounds(cfg, ad, {"val_suite": None}, ([layer], None, grads), {}, choose, stages)


def test_without_the_margin_the_first_step_that_stops_the_answers_is_taken(embedded, monkeypatch):
    edits, info = _run(embedded, monkeypatch, None)
    assert 0.2 <= edits[0].search.step_size < 0.25 and info["vlm_search"]["name_prob"] is None


def test_with_the_margin_the_name_must_also_be_unlikely(embedded, monkeypatch):
    edits, info = _run(embedded, monkeypatch, 0.1)
    assert 0.36 - 1e-9 <= edits[0].search.step_size < 0.4 and info["vlm_search"]["name_prob"] == 0.1


def test_a_name_that_stays_likely_is_refused_and_the_refusal_says_what_it_counted(embedded, monkeypatch):
    with pytest.raises(SearchFailed, match=r"answered with the name or giving it probability >= 0\.1\)"):
        _run(embedded, monkeypatch, 0.1, floor=0.2)


def test_name_prob_outside_its_range_is_refused():
    from slugkit.workflows.vlm_demo import vlm_chooser

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="name_prob"):
            vlm_chooser(["x"], None, None, {}, [], name_prob=bad)
