"""Worst-case collateral bookkeeping (issue 12): per-concept drops, the worst one, the nearest neighbours."""

import pytest
import torch

from slugkit.eval.collateral import collateral_record, nearest_concepts, worst_drop


def test_nearest_concepts_rank_by_cosine_and_skip_targets():
    names = ["t", "a", "b", "c", "d"]
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [-1.0, 0.0]])
    got = nearest_concepts(emb * 3.0, names, [0], k=3)  # scale-free: rows are normalised
    assert [n for n, _ in got] == ["a", "c", "b"]
    assert got[0][1] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5, abs=1e-6)
    # several targets: a concept's similarity is its largest to any of them; excluded names never come back
    got = nearest_concepts(emb, names, [0, 2], k=2, exclude={"a"})
    assert [n for n, _ in got] == ["c", "d"]
    with pytest.raises(ValueError, match="do not match"):
        nearest_concepts(emb[:3], names, [0])


def test_worst_drop_picks_the_largest_and_breaks_ties_by_name():
    before = {"b": 1.0, "a": 0.9, "c": 0.5}
    after = {"b": 0.7, "a": 0.6, "c": 0.5}
    assert worst_drop(before, after) == ("a", pytest.approx(0.3))  # a and b both drop 0.3: name order
    assert worst_drop({}, {}) == (None, 0.0)


def test_collateral_record_reports_what_the_mean_hides():
    # 9 concepts lose nothing, one look-alike collapses: the mean drop is 0.07, the worst 0.7
    before = {f"c{i}": 1.0 for i in range(9)} | {"look-alike": 0.9}
    after = {f"c{i}": 1.0 for i in range(9)} | {"look-alike": 0.2}
    rec = collateral_record(before, after, [("look-alike", 0.8), ("c3", 0.4), ("gone", 0.3)], "top-1", k=3)
    assert rec["mean_drop"] == pytest.approx(0.07)
    assert rec["worst"] == {"concept": "look-alike", "before": 0.9, "after": pytest.approx(0.2), "drop":
                            pytest.approx(0.7)}
    assert [n["concept"] for n in rec["neighbours"]["concepts"]] == ["look-alike", "c3"]  # unmeasured ones left out
    assert rec["neighbours"]["k"] == 3 and rec["concepts"] == 10
    assert rec["per_concept"]["c0"]["drop"] == 0.0
    with pytest.raises(ValueError, match="different concepts"):
        collateral_record(before, {"c0": 1.0}, [], "top-1")

