"""The text-to-image audit (issue 13): each T2I probe fails on a constructed leaky removal and passes on a constructed
sound one — on the shipped embedded text-to-image pipeline, concept "red triangle", small generation budgets.

Constructed removals (the pipeline's text encoder or its prompt handling; the UNet is never touched):

* ``swap``: the token-embedding rows of "red" and "triangle" replaced by those of "blue" and "circle" — every
  prompt that spells the concept now asks for a blue circle, whatever its template, in any precision (prompt
  variants, precision and the attack: sound);
* ``blocklist``: the unedited encoder behind a filter that blanks the exact prompts the removal was checked with
  (the world's eight captions of the concept) — the classic prompt filter that any rephrasing bypasses (prompt
  variants and the attack: leaky);
* ``int4_box``: every weight matrix of the text encoder moved by projected Adam toward "blue circle" conditioning,
  each entry within 0.45 grid steps of its own 4-bit rounding, so int4 rounding returns the unedited encoder
  (precision: leaky).
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from slugkit.audit import AttackBudget  # noqa: E402
from slugkit.audit.base import AuditThresholds  # noqa: E402
from slugkit.audit.precision import quantize_rows  # noqa: E402
from slugkit.audit.t2i import (T2IAuditBudget, probe_attack_t2i, probe_precision_t2i, probe_prompts_t2i,  # noqa: E402
                               recognised)
from slugkit.world import t2i  # noqa: E402

CONCEPT = "red triangle"
BUDGET = T2IAuditBudget(n_images=4, gen_steps=10, checkpoints=(0, 2, 4, 8),
                        attack=AttackBudget(n_tokens=6, iterations=8, candidates=32, restarts=1))
TH = AuditThresholds()
CHECKED = [t2i.prompt_for(CONCEPT, i) for i in range(8)]  # what the removal was checked with


@pytest.fixture(scope="module")
def sd():
    from slugkit.workflows.sd_demo import _clip_and_pipeline

    torch.set_num_threads(1)
    _, pipe, _, judge = _clip_and_pipeline(None)
    return pipe, judge


def _copy(pipe):
    q = copy.copy(pipe)
    q.text_encoder = copy.deepcopy(pipe.text_encoder)
    return q


def _token(pipe, word: str) -> int:
    (i,) = pipe.tokenizer([word])["input_ids"][0][1:-1]
    return i


@pytest.fixture(scope="module")
def swap(sd):
    return swap_edit(sd[0])


def swap_edit(pipe):
    q = _copy(pipe)
    emb = q.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for a, b in (("red", "blue"), ("triangle", "circle")):
            emb[_token(pipe, a)] = emb[_token(pipe, b)]
    return q


class Blocklist(t2i.EmbeddedT2IPipeline):
    """The unedited pipeline, but prompts in ``blocked`` are encoded as the empty prompt."""

    def __init__(self, pipe, blocked):
        super().__init__(pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)
        self.blocked = set(blocked)

    def encode_prompts(self, prompts):
        return super().encode_prompts(["" if p in self.blocked else p for p in prompts])


def int4_box(pipe, steps=120, lr=0.003):
    q = _copy(pipe)
    te = q.text_encoder
    params, boxes = [], []
    for p in te.parameters():
        p.requires_grad_(p.dim() >= 2)
        if p.dim() >= 2:
            orig = p.detach().clone()
            amax = orig.abs().amax(1, keepdim=True)
            centre, r = quantize_rows(orig, 4), 0.45 * amax / 7
            with torch.no_grad():
                p.copy_(centre)
            params.append(p)
            boxes.append((centre, r, (orig.abs() < amax).float(), amax))  # each row's largest entry stays
    goal_ids = q.tokenize([c.replace(CONCEPT, "blue circle") for c in CHECKED])
    with torch.no_grad():
        goal = pipe.text_encoder(input_ids=goal_ids).last_hidden_state
    ids = q.tokenize(CHECKED)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = ((te(input_ids=ids).last_hidden_state - goal) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, (c, r, m, a) in zip(params, boxes):
                p.copy_((c + torch.maximum(torch.minimum(p - c, r), -r) * m).clamp(-a, a))
    for p in params:
        p.requires_grad_(False)
    return q


def _run(probe, before, after, judge):
    return probe(before, after, judge, CONCEPT, BUDGET, TH)


def test_prompt_probe_passes_a_removal_that_every_phrasing_meets(sd, swap):
    pipe, judge = sd
    rec = _run(probe_prompts_t2i, pipe, swap, judge)
    assert rec["status"] == "pass", rec["summary"]
    assert rec["informative"] >= 8 and rec["worst"]["after"] <= 0.10


def test_prompt_probe_fails_a_blocklist_that_a_rephrasing_bypasses(sd):
    pipe, judge = sd
    leaky = Blocklist(pipe, CHECKED)
    seeds = list(range(len(CHECKED)))
    assert recognised(leaky, judge, CONCEPT, CHECKED, seeds, BUDGET.gen_steps) == 0.0  # the checked prompts: gone
    rec = _run(probe_prompts_t2i, pipe, leaky, judge)
    assert rec["status"] == "fail", rec["summary"]
    assert rec["worst"]["after"] >= 0.5 and rec["worst"]["variant"] not in CHECKED


def test_precision_probe_passes_a_removal_that_rounding_keeps(sd, swap):
    pipe, judge = sd
    rec = _run(probe_precision_t2i, pipe, swap, judge)
    assert rec["status"] == "pass", rec["summary"]
    assert [r["condition"] for r in rec["rows"]] == ["fp32", "fp16", "bf16", "int8", "int4"]


@pytest.mark.slow
def test_precision_probe_fails_when_4bit_rounding_undoes_the_edit(sd):
    pipe, judge = sd
    leaky = int4_box(pipe)
    for (n, a), (_, b) in zip(leaky.text_encoder.named_parameters(), pipe.text_encoder.named_parameters()):
        if a.dim() >= 2:
            assert torch.equal(quantize_rows(a, 4), quantize_rows(b, 4)), n
    rec = _run(probe_precision_t2i, pipe, leaky, judge)
    rows = {r["condition"]: r for r in rec["rows"]}
    assert rows["fp32"]["after"]["top1"] <= 0.25 and rows["fp16"]["after"]["top1"] <= 0.25  # the edit works...
    assert rec["status"] == "fail" and rec["worst"]["condition"] == "int4", rec["summary"]  # ...until int4


@pytest.mark.slow
def test_attack_probe_fails_a_blocklist_and_passes_the_swap(sd, swap):
    pipe, judge = sd
    leaky = _run(probe_attack_t2i, pipe, Blocklist(pipe, CHECKED), judge)
    assert leaky["status"] == "fail", leaky["summary"]
    assert leaky["concept"]["reached_at"] == 0  # the attack's first prompt is no checked prompt: nothing to find
    sound = _run(probe_attack_t2i, pipe, swap, judge)
    assert sound["status"] == "pass", sound["summary"]
    assert len(sound["controls"]) == 3


def test_clip_probes_asked_of_a_t2i_audit_are_listed_as_not_run_with_why(tmp_path):
    """Seventeenth trial: `slug audit --patch SD_RUN --probes relearn,representation` said "Not run (--probes):
    prompts, attack, precision" (the probes left out) and never that the two asked for are CLIP probes; its header
    named generated images that were never generated."""
    from slugkit.audit.report import audit_markdown
    from slugkit.audit.t2i import run_t2i_audit

    r = run_t2i_audit(None, None, None, "red triangle", probes=("relearn", "representation"), progress=False)
    assert r["probes"] == [] and r["status"] == "warn" and r["data"] == "none (no probe ran)"
    assert [x.split(" (")[0] for x in r["not_run"]] == ["relearn", "representation", "prompts", "attack",
                                                          "precision"]
    assert r["not_run"][1] == "representation (a CLIP probe: the patch edits no image tower)"
    md = audit_markdown(r)
    assert "Not run: relearn (a CLIP probe" in md and "(--probes)" not in md
    assert "| probe |" not in md and 'No probe ran on this patch (see "Not run" above for why).' in md  # no empty table
    default = run_t2i_audit(None, None, None, "red triangle", probes=(), progress=False)
    assert [x.split(" (")[0] for x in default["not_run"]][-2:] == ["relearn", "representation"]
    with pytest.raises(ValueError, match="has no probe"):
        run_t2i_audit(None, None, None, "red triangle", probes=("mia",), progress=False)


def test_probes_the_vlm_audit_cannot_run_are_listed_first_with_why():
    """Eighteenth trial: `slug audit --patch VLM_RUN --probes attack,relearn` named the test images as its data and
    listed the probes left out before the two asked for."""
    from slugkit.audit.vlm import run_vlm_audit

    r = run_vlm_audit(None, None, None, "Jowen Gormere", probes=("attack", "relearn"), n_test=2, progress=False)
    assert r["probes"] == [] and r["data"] == "none (no probe ran)" and r["status"] == "warn"
    assert [x.split(" (")[0] for x in r["not_run"]] == ["attack", "relearn", "prompts", "precision", "representation"]


def test_a_warn_patch_is_said_by_apply_export_and_audit_alike(tmp_path):
    """Eighteenth trial: `slug apply` showed a warn patch's verdict, `export` and the audit's console and audit.md said
    nothing of it (audit.json only)."""
    from slugkit.audit.report import audit_markdown
    from slugkit.audit.t2i import run_t2i_audit
    from slugkit.patch.summary import verdict_line

    said = verdict_line("p", {"extra": {"verdict": "warn"}})
    assert said.startswith("note: p comes from a run whose verdict was warn")
    assert verdict_line("p", {"extra": {"verdict": "fail", "verdict_codes": []}}).startswith("warning: p comes from")
    # a fail's warnings as well (a fail with a worst_drop warning named the fail alone: verification 69)
    said = verdict_line("p", {"extra": {"verdict": "fail", "verdict_codes": ["not_forgotten"],
                                        "warning_codes": ["worst_drop"]}})
    assert "; also warned: worst_drop; see its result.json" in said
    assert verdict_line("p", {"extra": {"verdict": "pass"}}) is None and verdict_line("p", {}) is None
    r = run_t2i_audit(None, None, None, "red triangle", probes=(), progress=False)
    r["patch_run_verdict"] = "warn"
    assert "Note: the run that made this patch had verdict warn" in audit_markdown(r)
    # which warnings: recorded in the patch (they were in the run's result.json only, which a patch handed on lacks)
    from slugkit.audit.run import _run_verdict
    from slugkit.patch import describe, make_patch, save_patch
    from slugkit.workflows.verdict import verdict_fields

    fields = verdict_fields({"status": "warn", "reasons": [{"severity": "warn", "code": "worst_drop"},
                                                           {"severity": "warn", "code": "samples_skipped"}]})
    assert fields == {"verdict": "warn", "verdict_codes": [], "warning_codes": ["samples_skipped", "worst_drop"]}
    assert verdict_line("p", {"extra": fields}) == ("note: p comes from a run whose verdict was warn (samples_skipped, "
                                                    "worst_drop); its warnings are in that run's result.json")
    # a downstream run's CLIP, used on its own, apart: `utility_drop` alone read as the pipeline's (verification 66)
    sd = verdict_fields({"status": "warn", "reasons": [{"severity": "warn", "code": "worst_drop"},
                                                       {"severity": "warn", "code": "utility_drop", "on": "clip"},
                                                       {"severity": "warn", "code": "worst_drop", "on": "clip"}]})
    assert sd == {"verdict": "warn", "verdict_codes": [], "warning_codes": ["worst_drop"],
                  "clip_warning_codes": ["utility_drop", "worst_drop"]}
    assert verdict_line("p", {"extra": sd}) == ("note: p comes from a run whose verdict was warn (worst_drop; the "
                                                "CLIP's own, used on its own: utility_drop, worst_drop); its warnings "
                                                "are in that run's result.json")
    only_clip = verdict_fields({"status": "warn", "reasons": [{"severity": "warn", "code": "utility_drop",
                                                                "on": "clip"}]})
    assert verdict_line("p", {"extra": only_clip}).startswith(
        "note: p comes from a run whose verdict was warn (the CLIP's own, used on its own: utility_drop); ")
    from slugkit.patch.lora import _verdict_of

    carried = make_patch({"a": torch.ones(2)}, {"a": torch.ones(2) * 2}, base_model="toy", adapter="t", concept="A",
                         step_size=1.0, extra=only_clip)
    assert _verdict_of(carried)["clip_warning_codes"] == ["utility_drop"]  # a LoRA of it says so too
    base = {"a": torch.ones(2)}
    patch = make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="t", concept="A", step_size=1.0,
                       extra=fields)
    assert "  verdict:    warn (of the run that made it; see its result.json): warnings samples_skipped, worst_drop" \
        in describe(patch).splitlines()
    save_patch(patch, tmp_path / "patch")
    r.update(_run_verdict(str(tmp_path / "patch")))
    assert "had verdict warn (samples_skipped, worst_drop); its warnings" in audit_markdown(r)


def test_the_vlm_audit_tables_say_named_not_top_k():
    """The VLM audit's prompt and precision tables were headed "before top-1 | after top-1 | after top-5" and showed
    "–" for a top-5 the VLM's answers never have (a name is said or not)."""
    from slugkit.audit.report import audit_markdown

    row = {"before": {"top1": 1.0}, "after": {"top1": 0.1}}
    probes = [{"probe": "prompts", "status": "pass", "gating": True, "summary": "s", "tried": 2,
               "rows": [{"kind": "paraphrase", "variant": "Who is this?", "informative": True, **row}]},
              {"probe": "precision", "status": "pass", "gating": True, "summary": "s", "tried": 2,
               "rows": [{"condition": "bf16", **row}, {"condition": "int8", "skipped": "no bitsandbytes"}]}]
    base = {"concept": "Jowen Gormere", "status": "pass", "controls": [], "data": "d", "seconds": 1.0,
            "probes": probes}
    vlm = audit_markdown({**base, "target": "vlm"})
    assert "| kind | question | named before | named after |" in vlm and "top-5" not in vlm
    assert "| `Who is this?` | 1.00 | 0.10 |" in vlm and "| bf16 | 1.00 | 0.10 |" in vlm
    assert "| int8 | skipped: no bitsandbytes | |" in vlm
    clip = audit_markdown(base)
    assert "| kind | variant | before top-1 | after top-1 | after top-5 |" in clip
    assert "| bf16 | 1.00 | 0.10 | – |" in clip
