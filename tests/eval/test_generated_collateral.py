"""Worst-case collateral of a text-to-image evaluation (slugkit.eval.generated): class embeddings from a pipeline's
text encoder, the target's nearest neighbours, plans topped up for them, and the per-concept record."""

from types import SimpleNamespace

import pytest
import torch

from slugkit.eval.generated import (
    GenerationPlan,
    collateral_of,
    pipeline_tokenize,
    target_neighbours,
    text_class_embeddings,
)


class FakeEncoder(torch.nn.Module):
    """input_ids [N, 2] -> pooled features: row ``ids[:, 0]`` of a fixed table (the 'concept' token)."""

    def __init__(self, table: torch.Tensor, projects: bool = False):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.projects = projects

    def forward(self, input_ids):
        f = self.table[input_ids[:, 0]]
        return SimpleNamespace(text_embeds=f if self.projects else None, pooler_output=f)


VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3}
TABLE = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])


def _tokenize(prompts):
    return torch.tensor([[VOCAB[p.split()[-1]], 0] for p in prompts])


def test_class_embeddings_average_normalised_prompt_features_and_project():
    enc = FakeEncoder(TABLE)
    emb = text_class_embeddings(enc, _tokenize, ["a", "c"], lambda n: [f"x {n}", f"y {n}"])
    torch.testing.assert_close(emb, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    mixed = text_class_embeddings(enc, _tokenize, ["ab"], lambda n: ["x a", "x c"])  # two prompts averaged
    torch.testing.assert_close(mixed, torch.tensor([[2 ** -0.5, 2 ** -0.5, 0.0]]))
    swap = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        swap.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(text_class_embeddings(enc, _tokenize, ["a"], lambda n: ["x a"], projection=swap),
                               torch.tensor([[0.0, 1.0, 0.0]]))
    # an encoder that projects itself (text_embeds) is not projected twice
    torch.testing.assert_close(text_class_embeddings(FakeEncoder(TABLE, True), _tokenize, ["a"], lambda n: ["x a"],
                                                     projection=swap), torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="no prompts"):
        text_class_embeddings(enc, _tokenize, ["a"], lambda n: [])


def test_target_neighbours_by_the_pipelines_own_text_encoder():
    pipe = SimpleNamespace(text_encoder=FakeEncoder(TABLE), tokenize=_tokenize)
    nb = target_neighbours(pipe, "a", ["a", "b", "c", "d"], lambda n: [f"p {n}"], k=2)
    assert [n for n, _ in nb] == ["b", "d"]  # cosines 0.994, 0.6; c is orthogonal; a itself is never returned
    assert abs(nb[0][1] - 0.9 / (0.82 ** 0.5)) < 1e-5
    assert [n for n, _ in target_neighbours(pipe, "c", ["a", "b", "c", "d"], lambda n: [f"p {n}"], k=1)] == ["b"]
    # a diffusers-style pipeline (no .tokenize) is tokenised to the tokenizer's model_max_length
    calls = []

    def tok(prompts, **kw):
        calls.append(kw)
        return {"input_ids": _tokenize(prompts)}

    tok.model_max_length = 77
    assert pipeline_tokenize(SimpleNamespace(tokenizer=tok))(["q a"]).tolist() == [[0, 0]]
    assert calls[0]["max_length"] == 77 and calls[0]["padding"] == "max_length"


def test_plan_topped_up_for_neighbours_keeps_the_planned_images():
    plan = GenerationPlan.build("t", ["t", "n1", "o", "n2"], "a {}.", n_target=3, n_other=2, seed=1)
    up = plan.topped_up(["n1", "n2"], 5)
    assert [it for it in up.items if it[0] in ("t", "o")] == [it for it in plan.items if it[0] in ("t", "o")]
    for c in ("n1", "n2"):
        own = [it for it in up.items if it[0] == c]
        assert len(own) == 5 and own[:2] == [it for it in plan.items if it[0] == c]
        assert [s for _, _, s in own] == list(range(own[0][2], own[0][2] + 5)) and {p for _, p, _ in own} == {
            f"a {c}."}
    assert len({s for _, _, s in up.items}) == len(up.items)  # still one seed per image
    assert plan.topped_up(["n1"], 1).items == plan.items  # never fewer
    with pytest.raises(ValueError, match="not in the generation plan"):
        plan.topped_up(["zz"], 5)
    with pytest.raises(ValueError, match="at most 1000"):
        plan.topped_up(["n1"], 1001)


def test_collateral_of_leaves_the_target_out_and_names_the_worst_and_the_neighbours():
    before = {"per_concept": {"t": 0.9, "n1": 0.9, "n2": 0.8, "o": 1.0}}
    after = {"per_concept": {"t": 0.0, "n1": 0.2, "n2": 0.8, "o": 0.95}}
    c = collateral_of(before, after, "T", [("n1", 0.7), ("n2", 0.6)], k=2, similarity="cos")
    assert c["concepts"] == 3 and set(c["per_concept"]) == {"n1", "n2", "o"}
    assert c["worst"]["concept"] == "n1" and abs(c["worst"]["drop"] - 0.7) < 1e-9
    assert abs(c["mean_drop"] - (0.7 + 0.0 + 0.05) / 3) < 1e-9
    assert [(n["concept"], round(n["drop"], 6)) for n in c["neighbours"]["concepts"]] == [("n1", 0.7), ("n2", 0.0)]
    assert c["neighbours"]["k"] == 2 and c["neighbours"]["similarity"] == "cos"
