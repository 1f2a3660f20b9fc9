"""Zero-shot evaluation (spec §1.4, §8.2, §10.9): classifiers, top-k counts, forget / related / utility metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import IDENTITY_TEMPLATES, NAMES, UTILITY_CLASSES, UTILITY_TEMPLATES

from slugkit.eval.zeroshot import (
    PARTS,
    EvalSuite,
    ImageSet,
    SuiteEvaluator,
    classifier_from_features,
    evaluate_suite,
    metrics_from_features,
    topk_hits,
)


# ---------------------------------------------------------------------------------------------- classifier
def test_classifier_from_features_matches_manual_loop():
    C, T, D = 5, 3, 8
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(C * T, D, generator=g), dim=-1)  # class-major: row c*T + t
    w = classifier_from_features(feats, C, T)
    assert w.shape == (D, C)
    for c in range(C):
        col = sum(feats[c * T + t] for t in range(T)) / T
        col = col / col.norm()
        assert torch.allclose(w[:, c], col, rtol=0, atol=1e-6)
    assert torch.allclose(w.norm(dim=0), torch.ones(C), atol=1e-6)
    # class-major matters: a template-major reading gives another matrix
    wrong = F.normalize(feats.reshape(T, C, D).mean(0), dim=-1).T
    assert not torch.allclose(w, wrong, atol=1e-3)


def test_classifier_matches_open_clip_build_zero_shot_classifier(adapter):
    open_clip = pytest.importorskip("open_clip")
    prompts = [t.format(c) for c in NAMES for t in IDENTITY_TEMPLATES]
    with torch.no_grad():
        ours = classifier_from_features(adapter.encode_text(adapter.tokenize(prompts)), len(NAMES),
                                        len(IDENTITY_TEMPLATES))
    ref = open_clip.build_zero_shot_classifier(adapter.model, adapter.tokenizer, NAMES, IDENTITY_TEMPLATES,
                                               num_classes_per_batch=5, device="cpu")
    assert ref.shape == ours.shape == (32, len(NAMES))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)


def test_suite_evaluator_classifiers_match_open_clip(adapter, suite):
    open_clip = pytest.importorskip("open_clip")
    ev = SuiteEvaluator(adapter, suite)
    w_id, w_util = ev._classifiers(ev.base_txt)
    ref_id = open_clip.build_zero_shot_classifier(adapter.model, adapter.tokenizer, suite.names,
                                                  suite.identity_templates)
    ref_util = open_clip.build_zero_shot_classifier(adapter.model, adapter.tokenizer, suite.utility_classnames,
                                                    suite.utility_templates)
    assert torch.allclose(w_id, ref_id, rtol=0, atol=1e-5)
    assert torch.allclose(w_util, ref_util, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- top-k counts
def test_topk_hits_on_fixed_logits():
    logits = torch.tensor([
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0: rank 1
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 3: rank 5
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 2: rank 6
        [0.0, 7.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 2: rank 6
        [0.0, 7.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 6: rank 2
    ])
    labels = torch.tensor([0, 3, 2, 2, 6])
    assert topk_hits(logits, labels, 1).tolist() == [True, False, False, False, False]
    assert topk_hits(logits, labels, 2).tolist() == [True, False, False, False, True]
    assert topk_hits(logits, labels, 4).tolist() == [True, False, False, False, True]
    assert topk_hits(logits, labels, 5).tolist() == [True, True, False, False, True]
    assert topk_hits(logits, labels, 6).tolist() == [True, True, True, True, True]
    assert int(topk_hits(logits, labels, 5).sum()) == 3
    assert topk_hits(logits, labels, 50).all()  # k > number of classes: clamped, everything is a hit


# ---------------------------------------------------------------------------------------------- metrics
def _onehot_suite():
    """6 names (target 0), D = 6, identity classifier = identity matrix; an image feature is a logit row / norm."""
    names = [f"n{i}" for i in range(6)]
    suite = EvalSuite(
        names=names, identity_templates=["{}"], target=0,
        forget=ImageSet(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)),
        related=ImageSet(torch.zeros(5, 1), torch.tensor([1, 1, 1, 2, 2])),
        utility_classnames=["u0", "u1", "u2"], utility_templates=["{}"],
        utility=ImageSet(torch.zeros(4, 1), torch.tensor([0, 1, 2, 2])),
    )
    return suite


def test_metrics_from_features_hand_case():
    suite = _onehot_suite()
    w_id, w_util = torch.eye(6), torch.eye(3)
    # target 0 ranked: 1st, 2nd, 6th  -> FA@1 = 1/3, FA@5 = 2/3
    forget = torch.tensor([[6, 5, 4, 3, 2, 1], [5, 6, 4, 3, 2, 1], [1, 6, 5, 4, 3, 2]], dtype=torch.float)
    # identity 1: 3 images, all right; identity 2: 2 images, 0 right -> macro 0.5, micro 3/5
    related = torch.tensor([[0, 9, 1, 0, 0, 0]] * 3 + [[0, 9, 1, 0, 0, 0]] * 2, dtype=torch.float)
    # utility: predictions 0, 2, 2, 1 vs labels 0, 1, 2, 2 -> top-1 = 2/4
    utility = torch.tensor([[3, 1, 2], [1, 2, 3], [1, 2, 3], [1, 3, 2]], dtype=torch.float)
    img = {k: F.normalize(v, dim=-1) for k, v in (("forget", forget), ("related", related), ("utility", utility))}
    m = metrics_from_features(suite, img, w_id, w_util)
    assert m["forget_top1"] == pytest.approx(1 / 3, rel=1e-6)
    assert m["forget_top5"] == pytest.approx(2 / 3, rel=1e-6)
    assert m["related_top1"] == pytest.approx(0.5, rel=1e-9)  # unweighted mean over identities
    micro = topk_hits(related @ w_id, suite.related.labels, 1).float().mean().item()
    assert micro == pytest.approx(0.6) and m["related_top1"] != pytest.approx(micro)
    assert m["utility_top1"] == pytest.approx(0.5, rel=1e-6)
    assert m["utility_top5"] == 1.0  # 3 classes: k clamped
    assert set(m) == {"forget_top1", "forget_top5", "related_top1", "related_by_concept", "utility_top1",
                      "utility_top5"}
    names = suite.names
    assert m["related_by_concept"] == {names[1]: 1.0, names[2]: 0.0}  # each identity's own top-1 (worst case)
    assert set(metrics_from_features(suite, img, w_id, w_util, ("forget",))) == {"forget_top1", "forget_top5"}
    assert set(metrics_from_features(suite, img, w_id, None, ("related",))) == {"related_top1", "related_by_concept"}


def _hand_metrics(adapter, suite):
    """Every metric recomputed from the full encoders and open_clip's classifier, image set by image set."""
    open_clip = pytest.importorskip("open_clip")
    w_id = open_clip.build_zero_shot_classifier(adapter.model, adapter.tokenizer, suite.names, suite.identity_templates)
    w_util = open_clip.build_zero_shot_classifier(adapter.model, adapter.tokenizer, suite.utility_classnames,
                                                  suite.utility_templates)
    with torch.no_grad():
        lf = 100 * adapter.encode_image(suite.forget.images) @ w_id
        lr = 100 * adapter.encode_image(suite.related.images) @ w_id
        lu = 100 * adapter.encode_image(suite.utility.images) @ w_util
    rank_t = (lf > lf[:, suite.target:suite.target + 1]).sum(1)  # number of names scoring above the target
    pred_r = lr.argmax(1)
    per_id = {suite.names[c]: float((pred_r[suite.related.labels == c] == c).float().mean())
              for c in sorted(set(suite.related.labels.tolist()))}
    return {
        "forget_top1": float((rank_t < 1).float().mean()),
        "forget_top5": float((rank_t < 5).float().mean()),
        "related_top1": sum(per_id.values()) / len(per_id),
        "related_by_concept": per_id,
        "utility_top1": float((lu.argmax(1) == suite.utility.labels).float().mean()),
        "utility_top5": float((lu.topk(5, 1).indices == suite.utility.labels[:, None]).any(1).float().mean()),
    }


@pytest.mark.parametrize("which", ["random", "trained"])
def test_suite_evaluator_base_metrics_by_hand(request, suite, which):
    a = request.getfixturevalue("adapter" if which == "random" else "trained_adapter")
    ev = SuiteEvaluator(a, suite, batch_size=5)  # several batches, a partial last one
    m = ev.base_metrics()
    hand = _hand_metrics(a, suite)
    assert set(m) == set(hand)
    for k in hand:
        assert m[k] == pytest.approx(hand[k], abs=1e-6), k
    assert evaluate_suite(a, suite) == m
    assert ev.evaluate_naive(PARTS) == m
    if which == "trained":  # the trained fixture recognises everything: the metrics are not trivially zero
        assert m["related_by_concept"] == {n: 1.0 for n in m["related_by_concept"]}
        assert {k: v for k, v in m.items() if k != "related_by_concept"} == {k: 1.0 for k in m if
                                                                            k != "related_by_concept"}


def test_suite_prompts_and_sizes(suite):
    ident, util = suite.prompts()
    assert ident[:3] == ["a photo of alice abbott.", "alice abbott.", "a photo of bruno baker."]
    assert len(ident) == len(NAMES) * len(IDENTITY_TEMPLATES)
    assert len(util) == len(UTILITY_CLASSES) * len(UTILITY_TEMPLATES)
    assert suite.sizes() == {"names": 12, "concepts": [NAMES[0]], "forget": 4, "related": 8,
                             "related_identities": 4, "utility": 12, "utility_classes": 6}
