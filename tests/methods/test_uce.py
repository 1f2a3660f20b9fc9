"""UCE (spec baselines.md §6.1): the closed form is the minimiser it claims, the edit touches exactly the UNet's
cross-attention keys/values and reverts bit-exactly, and on the shipped embedded text-to-image model it erases."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slugkit.methods.diffusion import applied  # noqa: E402
from slugkit.methods.uce import closed_form, cross_attention_kv, prompt_keys, uce  # noqa: E402


def _objective(w, w_old, ke, vt, kp, se, sp, lamb):
    return (se * ((ke @ w.T - vt) ** 2).sum() + sp * ((kp @ w.T - kp @ w_old.T) ** 2).sum()
            + lamb * ((w - w_old) ** 2).sum())


@pytest.mark.parametrize("se,sp,lamb", [(1.0, 1.0, 0.5), (3.0, 0.1, 0.05)])
def test_closed_form_is_the_minimiser(se, sp, lamb):
    g = torch.Generator().manual_seed(0)
    w_old = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ke, kp = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    vt = torch.randn(2, 6, generator=g, dtype=torch.float64)
    w = closed_form(w_old, ke, vt, kp, se, sp, lamb).requires_grad_(True)
    _objective(w, w_old, ke, vt, kp, se, sp, lamb).backward()
    assert w.grad.abs().max() < 1e-9  # stationary, and the objective is strictly convex: the minimum
    worse = w.detach() + 1e-3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert _objective(worse, w_old, ke, vt, kp, se, sp, lamb) > _objective(w.detach(), w_old, ke, vt, kp, se, sp, lamb)
    # nothing to erase (targets = what W_old already gives) -> W_old itself
    assert torch.allclose(closed_form(w_old, ke, ke @ w_old.T, kp, se, sp, lamb), w_old, atol=1e-12)
    with pytest.raises(ValueError, match="shapes do not match"):
        closed_form(w_old, ke, vt[:, :5], kp)


@pytest.fixture(scope="module")
def tiny_pipe():
    from hf_tiny import build_adapter, tiny_sd_pipeline

    return tiny_sd_pipeline(build_adapter(seed=3))


def test_uce_edits_only_cross_attention_kv_and_reverts(tiny_pipe):
    p = tiny_pipe
    before = {n: t.detach().clone() for n, t in p.unet.state_dict().items()}
    erase, preserve = ["a photo of alice abbott.", "alice abbott."], ["a photo of bob brown.", "a photo of a dog."]
    r = uce(p.text_encoder, p.tokenizer, p.unet, erase, preserve, guide="a photo.", erase_scale=50.0)
    kv = cross_attention_kv(p.unet)
    n_attn2 = sum(1 for n, _ in p.unet.named_modules() if n.endswith("attn2"))
    assert set(r.tensors) == set(kv) and len(kv) == 2 * n_attn2 == 8  # down, mid, 2 up: every cross-attention's K and V
    assert r.storage_bytes == sum(t.numel() * 4 for t in r.tensors.values())
    assert all(torch.equal(t, before[n]) for n, t in p.unet.state_dict().items())  # uce() leaves the UNet alone
    ke, kg = prompt_keys(p.text_encoder, p.tokenizer, erase), prompt_keys(p.text_encoder, p.tokenizer, ["a photo."])
    kp = prompt_keys(p.text_encoder, p.tokenizer, preserve)
    with applied(p.unet, r.tensors):
        changed = [n for n, t in p.unet.state_dict().items() if not torch.equal(t, before[n])]
        assert sorted(changed) == sorted(kv)
        for n, w in cross_attention_kv(p.unet).items():
            w0 = before[n]
            moved = (ke @ w.detach().T - kg @ w0.T).norm() / (ke @ w0.T - kg @ w0.T).norm()
            assert moved < 0.2, n  # the erase keys now map (nearly) where the guide's does
            kept = (kp @ w.detach().T - kp @ w0.T).norm() / (kp @ w0.T).norm()
            assert kept < 0.2, n
    assert all(torch.equal(t, before[n]) for n, t in p.unet.state_dict().items())  # bit-exact revert


def test_prompt_keys_last_real_token_and_padding_free(tiny_pipe):
    p = tiny_pipe
    k20, k40 = (prompt_keys(p.text_encoder, p.tokenizer, ["a photo of alice abbott.", ""], max_length=m)
                for m in (30, 48))
    assert torch.allclose(k20, k40, atol=1e-5)  # causal text encoder: the padding length does not matter
    enc = p.tokenizer(["a photo of alice abbott."], return_tensors="pt")
    h = p.text_encoder(input_ids=enc["input_ids"]).last_hidden_state[0]
    assert torch.allclose(k20[0], h[enc["input_ids"].shape[1] - 2], atol=1e-5)  # the token before end-of-text


def test_uce_input_errors(tiny_pipe):
    p = tiny_pipe
    with pytest.raises(ValueError, match="at least one erase prompt"):
        uce(p.text_encoder, p.tokenizer, p.unet, [])
    with pytest.raises(ValueError, match="2 guide prompts for 1 erase"):
        uce(p.text_encoder, p.tokenizer, p.unet, ["a"], guide=["b", "c"])
    with pytest.raises(ValueError, match="both erased and preserved"):
        uce(p.text_encoder, p.tokenizer, p.unet, ["a dog."], ["a dog.", "a cat."])
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        with applied(p.unet, {"nope": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="no cross-attention"):
        cross_attention_kv(torch.nn.Linear(2, 2))


def test_uce_erases_on_the_embedded_text_to_image_model():
    """Real erasure: 'red triangle' (its 8 caption templates) toward "" while keeping the other 29 concepts'
    prompts; 8 generated images of the target and 1 of each other concept, same seeds before and after."""
    from slugkit.world import t2i

    torch.set_num_threads(1)
    pipe, judge, target = t2i.EmbeddedT2IPipeline.load(), t2i.ConceptJudge(), "red triangle"
    erase = [t2i.prompt_for(target, i) for i in range(8)]
    preserve = [t2i.prompt_for(c, i) for c in t2i.concept_names() if c != target for i in range(8)]
    r = uce(pipe.text_encoder, pipe.tokenizer, pipe.unet, erase, preserve, max_length=t2i.CONTEXT_LENGTH)
    plan = t2i.generation_plan(target, 8, 1, seed_base=10_000)
    before = t2i.recognition(pipe, judge, plan, steps=10)[0]
    with applied(pipe.unet, r.tensors):
        after = t2i.recognition(pipe, judge, plan, steps=10)[0]
    others = [c for c in before if c != target]
    mean = lambda d: sum(d[c] for c in others) / len(others)  # noqa: E731
    assert before[target] >= 0.75 and after[target] <= 0.25, (before[target], after[target])
    assert mean(before) - mean(after) < 0.25, (mean(before), mean(after))
