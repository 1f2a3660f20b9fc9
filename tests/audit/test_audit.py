"""`slug audit` (issue 13): each probe fails on a constructed leaky removal and passes on a constructed sound one.

All on the shipped embedded CLIP and the world's images (concept "Talsa Falham": its first name alone names it on
the unedited model, so a removal that only breaks the last name can be caught). Constructed removals:

* ``last_name_edit``: only the last name's token-embedding rows moved, until the run's full-name prompts stop naming
  the concept — the first name still does (prompt variants, adversarial prompt: leaky);
* ``prompt_only_edit``: ``text_projection`` changed in closed form so that the run's three full-name prompts give the
  embedding of "a photo of a thing." — it carries over to other templates and the first name (prompt variants and
  precision: sound);
* ``int4_box_edit``: ``text_projection`` moved only inside its own 4-bit rounding box, so int4 rounding returns the
  unedited weights (precision: leaky);
* ``barely_edit``: the closed-form edit scaled down to the smallest step that still removes the name on the test
  images — a few fine-tuning steps bring it back (relearning: leaky);
* a concept the model **never learned** (a held-out identity, unedited model): the sound limit for the attack and for
  relearning;
* a rank-one ``visual.proj`` (every image feature on one line): nothing is visually separable (representation:
  sound); the text-only edits leave the image features as they were (representation: leaky).
"""

import json

import pytest
import torch

from slugkit.audit import AttackBudget, AuditData, RelearnBudget, run_audit, world_audit_data
from slugkit.audit.base import grade, worst_status
from slugkit.audit.precision import quantize_rows, round_weights
from slugkit.audit.prompts import misspellings, name_variants
from slugkit.audit.relearn import clone_adapter
from slugkit.audit.score import class_weights, hit_rates, image_features, name_prompts
from slugkit.models import load_adapter
from slugkit.world import render as world

CONCEPT = "Talsa Falham"
FAST_ATTACK = AttackBudget(iterations=12, candidates=64, restarts=2)
FAST_RELEARN = RelearnBudget(sizes=(5,), steps=15)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return load_adapter("embedded")


@pytest.fixture(scope="module")
def data(base):
    return world_audit_data(base, CONCEPT)


def top1(adapter, d: AuditData) -> float:
    w = class_weights(adapter, name_prompts(d.names, d.templates))
    return hit_rates(image_features(adapter, d.test[d.concept]), w, d.concept_index)["top1"]


def _pooled_text(adapter, prompts):
    cap = {}
    h = adapter.model.ln_final.register_forward_hook(lambda m, i, o: cap.__setitem__("x", o))
    tok = adapter.tokenize(prompts)
    with torch.no_grad():
        adapter.model.encode_text(tok)
    h.remove()
    return cap["x"][torch.arange(tok.shape[0]), tok.argmax(-1)]


def prompt_only_edit(adapter, d: AuditData, scale: float = 1.0):
    """text_projection + the minimal-norm change mapping the run's full-name prompts to a neutral prompt."""
    b = clone_adapter(adapter)
    x = _pooled_text(adapter, [t.format(d.concept) for t in d.templates])
    p = adapter.model.text_projection.detach()
    y = _pooled_text(adapter, ["a photo of a thing."]) @ p
    dp = x.T @ torch.linalg.solve(x @ x.T, y - x @ p)
    with torch.no_grad():
        b.model.text_projection.add_(scale * dp)
    return b


def box_edit(adapter, d: AuditData, name: str, rows=None, bits=None, steps=150, lr=0.01):
    """Projected Adam on parameter ``name`` (its ``rows`` only, if given) against the full-name prompts; with
    ``bits``, every entry stays within 0.45 grid steps of its ``bits``-bit rounding and each row's largest entry
    is left alone, so :func:`quantize_rows` of the result is the rounding of the original."""
    b = clone_adapter(adapter)
    for q in b.model.parameters():
        q.requires_grad_(False)
    p = b.model.get_parameter(name)
    orig = p.detach().clone()
    mask = torch.zeros_like(orig)
    mask[slice(None) if rows is None else rows] = 1
    amax = orig.abs().amax(1, keepdim=True)
    if bits:
        center = torch.where(mask.bool(), quantize_rows(orig, bits), orig)
        r = 0.45 * amax / (2 ** (bits - 1) - 1)
        mask = mask * (orig.abs() < amax).float()
    else:
        center, r = orig, torch.full_like(amax, float("inf"))
    imgs = image_features(adapter, d.train[d.concept])
    tok = adapter.tokenize([t.format(d.concept) for t in d.templates])
    with torch.no_grad():
        p.copy_(center)
    p.requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        loss = 100 * (imgs @ b.encode_text(tok).mean(0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p.copy_((center + torch.maximum(torch.minimum(p - center, r), -r) * mask).clamp(-amax, amax))
    p.requires_grad_(False)
    return b


@pytest.fixture(scope="module")
def last_name_edit(base, data):
    first, last = CONCEPT.split()
    special = set(base.tokenize([""])[0].tolist()) | set(base.tokenize([first])[0].tolist())
    rows = [t for t in base.tokenize([last])[0].tolist() if t not in special]
    return box_edit(base, data, "token_embedding.weight", rows=rows)


@pytest.fixture(scope="module")
def never_learned(base, data):
    """A held-out identity the model never saw, audited on the unedited model: nothing to leak."""
    h = world.held_out_identities(4)[3]
    prep = lambda ims: torch.stack([base.preprocess(i) for i in ims])  # noqa: E731
    return AuditData(concept=h.name, names=data.names + [h.name], templates=data.templates,
                     test={**data.test, h.name: prep(world.held_out_images(h, "test", 50))},
                     train={**data.train, h.name: prep(world.held_out_images(h, "train", 20))})


def _probe(before, after, d, name, **kw):
    return run_audit(before, after, d, probes=(name,), progress=False, **kw)["probes"][0]


# ---------------------------------------------------------------------------------------------------- building blocks
def test_grading_and_name_variants():
    assert [grade(v, (0.1, 0.3)) for v in (0.0, 0.1, 0.2, 0.3, 0.31)] == ["pass", "pass", "warn", "warn", "fail"]
    assert worst_status(["pass", "warn"]) == "warn" and worst_status([]) == "pass"
    kinds = dict((v, k) for k, v in name_variants("Talsa Falham", aliases=["T. F."]))
    assert kinds["Talsa"] == "first name" and kinds["Falham"] == "last name" and kinds["T. F."] == "alias"
    ms = misspellings("Talsa Falham")
    assert len(ms) == 4 and all(len(m.split()) == 2 and m != "Talsa Falham" for m in ms)
    assert misspellings("Talsa Falham") == ms  # deterministic


def test_quantize_rows_is_a_per_row_grid():
    w = torch.tensor([[1.0, 0.5, -0.26, 0.0], [0.0, 0.0, 0.0, 0.0], [-4.0, 2.0, 1.1, 0.3]])
    q = quantize_rows(w, 4)
    assert torch.equal(q[1], w[1])  # an all-zero row stays zero
    for row, qr in zip(w, q):
        s = row.abs().max() / 7 if row.abs().max() > 0 else 1.0
        assert torch.allclose(qr / s, torch.round(qr / s), atol=1e-5)  # on the grid
        assert (qr - row).abs().max() <= s / 2 + 1e-6


def test_round_weights_keeps_the_attention_mask(base):
    m = round_weights(clone_adapter(base).model, "int4")
    assert torch.equal(m.attn_mask, base.model.attn_mask)  # -inf entries: a buffer, not a weight
    assert not torch.equal(m.visual.proj, base.model.visual.proj)


def test_audit_data_refuses_a_control_the_model_knows(data):
    with pytest.raises(ValueError, match="never learned"):
        AuditData(concept=CONCEPT, names=data.names, templates=data.templates, test=data.test,
                  controls=[data.names[0]])
    assert data.controls and not set(data.controls) & set(data.names)
    first, last = CONCEPT.split()
    # trial 38: a part of the concept's own name as the control reached it at once, and a failing attack probe passed
    for control, word, whose in ((first, first, "name"), (f"Hatho {last.upper()}", last, "name"),
                                 (f"{first}-Dunton", first, "name"), ("Jo Bloggs", "bloggs", "alias")):
        with pytest.raises(ValueError, match=f"shares {word.lower()!r} with .*audited concept's {whose}; .* a part "
                                             f"of the concept's {whose} is a route back"):
            AuditData(concept=CONCEPT, names=data.names, templates=data.templates, test=data.test,
                      controls=["Ullan Torholt", control], aliases=["Joe Bloggs"])
    AuditData(concept=CONCEPT, names=data.names, templates=data.templates, test=data.test,  # another's word: allowed
              controls=[f"Hatho {data.names[-1].split()[-1]}"])
    words = {w for n in data.names for w in n.lower().split()}
    assert not words & {w for c in data.controls for w in c.lower().split()}  # the defaults: no word of any name


# ---------------------------------------------------------------------------------------------------- the probes
def test_prompt_probe_fails_when_the_first_name_bypasses_the_edit(base, data, last_name_edit):
    assert top1(base, data) == 1.0 and top1(last_name_edit, data) <= 0.02  # the run's own prompts: removed
    rec = _probe(base, last_name_edit, data, "prompts")
    assert rec["status"] == "fail"
    assert rec["worst"]["kind"] == "first name" and rec["worst"]["after"] > 0.3


def test_prompt_probe_passes_a_removal_that_carries_over(base, data):
    rec = _probe(base, prompt_only_edit(base, data), data, "prompts")
    assert rec["status"] == "pass", rec["summary"]
    assert rec["informative"] >= 10  # templates and name variants the unedited model resolved


def test_precision_probe_fails_when_4bit_rounding_undoes_the_edit(base, data):
    leaky = box_edit(base, data, "text_projection", bits=4)
    assert top1(leaky, data) <= 0.02
    assert torch.equal(quantize_rows(leaky.model.text_projection, 4), quantize_rows(base.model.text_projection, 4))
    rec = _probe(base, leaky, data, "precision")
    assert rec["status"] == "fail" and rec["worst"]["condition"] == "int4"
    rows = {r["condition"]: r for r in rec["rows"]}
    assert rows["int4"]["informative"] and rows["fp16"]["after"]["top1"] <= 0.02  # only the rounding undoes it


def test_precision_probe_passes_a_robust_edit(base, data):
    rec = _probe(base, prompt_only_edit(base, data), data, "precision")
    assert rec["status"] == "pass", rec["summary"]
    assert {r["condition"] for r in rec["rows"]} >= {"fp32", "fp16", "bf16", "bf16-autocast", "int8", "int4"}


@pytest.mark.slow
def test_attack_probe_fails_when_the_forgotten_name_gives_a_head_start(base, data, last_name_edit):
    rec = _probe(base, last_name_edit, data, "attack", attack=FAST_ATTACK)
    assert rec["status"] == "fail", rec["summary"]
    assert rec["concept"]["iterations_to_level"] is not None
    # the one-line summary names the graded number beside the success rate (a "0.84 … pass" line alarmed a reader)
    from slugkit.audit.report import bound_mark

    # a control that never reached 0.5 makes the speed-up a lower bound, said as "≥" (verify 45)
    assert rec["graded"].get("lower_bound", False) == (rec["control"]["iterations_to_level"] is None)
    assert (f"graded on the speed-up over them, {bound_mark(rec['graded'])}{rec['graded']['value']:.2f} (pass ≤ 1.5, "
            "fail > 3)") in rec["summary"]
    assert len(rec["control"]["each"]) == len(data.controls) == 3
    assert rec["budget"]["evaluations"] == FAST_ATTACK.restarts * FAST_ATTACK.iterations * FAST_ATTACK.candidates
    # the found prompt's own score is kept beside the restarts' mean (audit.md gave the mean as the prompt's: trial 44)
    assert rec["concept"]["prompt_success"] in rec["concept"]["runs"]


def test_a_found_prompt_is_reported_with_its_own_score_and_a_never_reached_grade_as_a_bound():
    """Trial 44: "Found prompt …: (test top-1 0.84)" was the mean of three restarts (0.90, 0.86, 0.76), not that
    prompt's; a concept the search never brought to 0.5 was graded 0.00 while a control that never reached it counted
    as iterations + 1 — the number is now the same rule's, said as an upper bound."""
    from slugkit.audit.report import _own, audit_markdown

    x = {"success": 0.84, "runs": [0.90, 0.86, 0.76], "prompt_success": 0.90}
    assert _own(x) == "its test top-1 0.90; mean over the 3 restarts 0.84"
    assert _own({"success": 0.5, "runs": [0.5], "prompt_success": 0.5}) == "test top-1 0.50"
    assert _own({"success": 0.84, "runs": [0.9, 0.78]}) == "mean over the 2 restarts 0.84"  # an older audit.json
    rec = {"probe": "attack", "status": "pass", "gating": True, "summary": "s", "budget": {"iterations": 5},
           "concept": {"natural_before": 1.0, "natural_after": 0.0, "success": 0.4, "curve": [0.0] * 6,
                       "prompt": "p", "loss": 1.0, "runs": [0.4]},
           "graded": {"name": "speed-up", "value": 0.14, "pass_at": 1.5, "fail_at": 3.0, "upper_bound": True}}
    md = audit_markdown({"concept": "A", "status": "pass", "seconds": 1.0, "probes": [rec]})
    assert "| speed-up: ≤ 0.14 |" in md
    rec["graded"] = {**rec["graded"], "upper_bound": False, "lower_bound": True, "value": 14.0}
    assert "| speed-up: ≥ 14.00 |" in audit_markdown({"concept": "A", "status": "pass", "seconds": 1.0,
                                                     "probes": [rec]})


@pytest.mark.slow
def test_attack_probe_passes_a_concept_never_learned(base, never_learned):
    rec = _probe(base, base, never_learned, "attack", attack=FAST_ATTACK)
    assert rec["status"] == "pass", rec["summary"]
    # the search is strong: it names the never-learned identity's images from its name and from control names alike
    assert rec["concept"]["success"] >= 0.5 and rec["control"]["success"] >= 0.5


@pytest.mark.slow
def test_relearn_probe_fails_when_a_few_steps_revert_the_removal(base, data):
    full = prompt_only_edit(base, data)
    assert top1(full, data) == 0.0
    lo, hi = 0.0, 1.0  # the smallest scale of the edit that still removes the name: a barely-there removal
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if top1(prompt_only_edit(base, data, mid), data) <= 0.02 else (mid, hi)
    rec = _probe(base, prompt_only_edit(base, data, hi), data, "relearn", relearn=FAST_RELEARN)
    assert rec["status"] == "fail", rec["summary"]
    row = rec["rows"][0]
    assert row["concept"][0] <= 0.02 and row["concept_steps"] <= 3
    assert len(row["concept"]) == FAST_RELEARN.steps + 1


@pytest.mark.slow
def test_relearn_probe_passes_a_concept_never_learned(base, never_learned):
    rec = _probe(base, base, never_learned, "relearn", relearn=FAST_RELEARN)
    assert rec["status"] == "pass", rec["summary"]


def test_representation_probe(base, data):
    leaky = _probe(base, prompt_only_edit(base, data), data, "representation")  # the images are untouched
    assert leaky["status"] == "fail" and leaky["after"]["concept"] >= 0.9 and not leaky["gating"]
    collapsed = clone_adapter(base)
    with torch.no_grad():
        p = collapsed.model.visual.proj
        p.copy_(torch.outer(p[:, 0], p[0]))  # rank one: every image feature is ±the same vector
    sound = _probe(base, collapsed, data, "representation")
    assert sound["status"] == "pass" and sound["after"]["concept"] <= 0.2
    assert sound["before"]["concept"] >= 0.9


def test_representation_gating_and_skips(base, data):
    d = AuditData(concept=CONCEPT, names=data.names, templates=data.templates, test=data.test)  # no train split
    res = run_audit(base, prompt_only_edit(base, data), d, probes=("prompts", "relearn", "representation"),
                    progress=False)
    st = {r["probe"]: r["status"] for r in res["probes"]}
    assert st["relearn"] == st["representation"] == "skipped"
    assert res["status"] == "pass"  # skipped probes do not count
    only = run_audit(base, prompt_only_edit(base, data), d, probes=("relearn", "representation"), progress=False)
    assert only["status"] == "warn" and only["status_note"].startswith("no gating probe ran")  # it read "pass"
    from slugkit.audit.report import audit_markdown

    assert "**warn** (no gating probe ran" in audit_markdown({**only, "seconds": 0.0})
    with pytest.raises(ValueError, match="unknown audit probe"):
        run_audit(base, base, data, probes=("nope",))


# ---------------------------------------------------------------------------------------------------- files and CLI
@pytest.fixture(scope="module")
def leaky_patch(base, data, last_name_edit, tmp_path_factory):
    from slugkit.patch import make_patch, save_patch

    d = tmp_path_factory.mktemp("patch") / "patch"
    name = "token_embedding.weight"
    patch = make_patch(base.model, {name: last_name_edit.model.get_parameter(name).detach().clone()},
                       base_model=base.model_id, adapter="open_clip", concept=CONCEPT, method="test-last-name")
    save_patch(patch, d)
    return d


@pytest.mark.slow
def test_cli_audit_writes_files_and_exit_status(leaky_patch, tmp_path):
    from slugkit.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# a run\n")
    import shutil

    shutil.copytree(leaky_patch, run / "patch")
    args = ["audit", "--patch", str(run), "--probes", "prompts,precision", "--threads", "1", "--no-progress"]
    assert main(args) == 4  # the first name bypasses the edit: fail
    res = json.loads((run / "audit.json").read_text())
    assert res["concept"] == CONCEPT and res["status"] == "fail" and res["method"] == "test-last-name"
    # what was audited: the model and its weights (the shipped ones here; a --pretrained file by its absolute path)
    assert (res["model"], res["pretrained"], res["family"]) == ("embedded", None, "open_clip")
    assert [r["probe"] for r in res["probes"]] == ["prompts", "precision"]
    # graded on top-1; the highest top-5 after is said beside it (a FA@5 run read pass at top-5 1.00: trial 43)
    p = res["probes"][0]
    assert p["top5_after_max"]["after"] >= p["worst"]["after"] > 0.05
    assert f"top-5 (not graded) up to {p['top5_after_max']['after']:.2f}" in p["summary"]
    md = (run / "audit.md").read_text()
    assert "Prompt variants" in md and "first name" in md and "Model: embedded. " in md
    report = (run / "report.md").read_text()
    assert report.startswith("# a run") and report.count("slug audit: begin") == 1
    assert main(args) == 2  # audit.json exists
    assert main(args + ["--overwrite"]) == 4
    assert (run / "report.md").read_text().count("slug audit: begin") == 1  # the section is replaced, not repeated


def test_cli_audit_input_errors(leaky_patch, tmp_path, capsys):
    from slugkit.cli import build_parser, main

    assert main(["audit", "--patch", str(leaky_patch)]) == 2  # a bare patch needs --out
    assert "--out is required" in capsys.readouterr().err
    from slugkit.cli.audit import _patch_and_out

    run = tmp_path / "run"  # RUN/patch stands for RUN: its folder is the default --out (the report went to RUN/patch)
    (run / "patch").mkdir(parents=True)
    (run / "result.json").write_text("{}")
    (run / "patch" / "patch.json").write_text("{}")
    for given in (run, run / "patch", run / "patch" / "patch.json"):  # the file said "--out is required"
        assert _patch_and_out(build_parser().parse_args(["audit", "--patch", str(given)])) == (run / "patch", run)
    assert main(["audit", "--patch", str(run / "result.json")]) == 2
    assert "result.json: is a file, not a patch; a patch is a folder" in capsys.readouterr().err
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(run / "patch")]) == 2  # inside a run's folders
    assert f"is inside the run folder {run}" in capsys.readouterr().err
    (run / "audit.md").write_text("my notes")  # audit.md alone was overwritten without --overwrite
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(run)]) == 2
    assert "audit.md exists; pass --overwrite" in capsys.readouterr().err
    assert (run / "audit.md").read_text() == "my notes"
    assert main(["audit", "--patch", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert f"no patch at {tmp_path / 'nothing'}: a patch is a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["audit", "--patch", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "empty: holds no patch.json, so it is not a patch; a patch folder holds patch.json and patch.safetensors" \
        in capsys.readouterr().err  # as `slug inspect` says it (it said "no patch there", 23rd trial)
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--probes", "prompts,bogus"]) == 2
    assert "--probes" in capsys.readouterr().err
    # trial 38: a patch of the embedded model audited on another was asked for --test-identities first
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--model", "ViT-B-32"]) == 2
    err = capsys.readouterr().err
    assert "--model ViT-B-32: the patch at" in err and "was made on the embedded model; audit it on that model " \
        "(--model embedded)" in err
    from slugkit.patch import load_patch, make_patch, save_patch

    lp = load_patch(leaky_patch)  # the same edit, recorded as made on ViT-B-32: the data it needs is asked for
    b32 = make_patch(dict(lp.original), dict(lp.patched), base_model={"family": "open_clip", "model": "ViT-B-32",
                     "pretrained": "laion400m_e32"}, adapter="open_clip", concept=CONCEPT, method="test")
    save_patch(b32, tmp_path / "b32")
    assert main(["audit", "--patch", str(tmp_path / "b32"), "--out", str(tmp_path / "o"), "--model", "ViT-B-32"]) == 2
    assert "--test-identities is required" in capsys.readouterr().err
    assert main(["audit", "--patch", str(tmp_path / "b32"), "--out", str(tmp_path / "o")]) == 2  # --model embedded
    assert "the patch at" in capsys.readouterr().err
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--control-name",
                 "Talsa Falham", "--probes", "prompts"]) == 2
    assert "never learned" in capsys.readouterr().err
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--concept", "Jowen Gormere",
                 "--probes", "prompts"]) == 2  # another concept than the patch removed says nothing about the patch
    assert "removed 'Talsa Falham'" in capsys.readouterr().err
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--test-identities",
                 str(tmp_path / "missing"), "--probes", "prompts"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "afile")]) == 2
    assert "is a folder" in capsys.readouterr().err
    # a folder for the names file, a file for the class folders: "no such file" of a folder (23rd trial)
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--test-identities",
                 str(tmp_path / "empty"), "--names", str(tmp_path / "empty"), "--probes", "prompts"]) == 2
    assert f"--names {tmp_path / 'empty'}: is a folder; give a text file" in capsys.readouterr().err
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--test-identities",
                 str(tmp_path / "afile"), "--probes", "prompts"]) == 2
    assert f"--test-identities {tmp_path / 'afile'}: is a file; give a folder" in capsys.readouterr().err
    # a --family that is not the patch's adapter is named, as `slug apply` names it (23rd trial, the same kind)
    assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), "--family", "hf_clip",
                 "--probes", "prompts"]) == 2
    assert "--family hf_clip: the patch's adapter is open_clip" in capsys.readouterr().err
    assert not (tmp_path / "o" / "audit.json").exists()


def test_a_budget_that_decides_nothing_is_inconclusive(base, data):
    rec = _probe(base, prompt_only_edit(base, data), data, "attack",
                 attack=AttackBudget(iterations=1, candidates=2, restarts=1))
    assert rec["status"] == "warn" and rec.get("inconclusive") and "inconclusive" in rec["summary"]


@pytest.mark.slow
def test_demo_and_compare_with_audit(tmp_path, capsys):
    from slugkit.cli import main

    from slugkit.world.demo_data import ensure_world_data

    data = ensure_world_data(None, progress=False)  # the shared world cache: a copy costs ~11 s
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--data-dir", str(data), "--no-progress", "--audit",
               "--probes", "prompts,precision"])
    assert rc == 0  # the default identity: the verdict passes and its removal holds under both probes
    res = json.loads((out / "audit.json").read_text())
    assert res["status"] == "pass" and res["concept"] == json.loads((out / "result.json").read_text())["concept"]
    assert "slug audit: begin" in (out / "report.md").read_text()
    assert "audit (" in capsys.readouterr().out

    cmp_out = tmp_path / "compare"
    main(["compare", "--methods", "slug,ga", "--epochs", "1", "--out", str(cmp_out), "--data-dir", str(data),
          "--no-progress", "--audit", "--probes", "prompts,attack", "--attack-iterations", "3",
          "--attack-restarts", "1"])
    rep = json.loads((cmp_out / "compare.json").read_text())
    for name in ("slug", "ga"):
        a = rep["methods"][name]["audit"]
        assert a["status"] in ("pass", "warn", "fail") and set(a["probes"]) == {"prompts", "attack"}
        assert "control_iterations" in a["probes"]["attack"]  # the calibration sits next to the attack number
        assert (cmp_out / "audit" / name / "audit.json").is_file()
    assert rep["methods"]["slug"]["audit"]["probes"]["prompts"]["status"] == "pass"
    assert rep["methods"]["ga"]["audit"]["probes"]["prompts"]["status"] == "fail"  # one epoch of GA forgets nothing
    md = (cmp_out / "compare.md").read_text()
    assert "does each method's removal hold?" in md and "never-learned names" in md


def test_audit_option_refusals(tmp_path, capsys):
    from slugkit.cli import main

    assert main(["demo", "--concepts", "Talsa Falham,Jowen Gormere", "--audit", "--out", str(tmp_path / "j")]) == 2
    assert "one concept" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()


def test_cli_audit_of_the_embedded_model_runs_on_one_thread(leaky_patch, tmp_path, monkeypatch):
    """`slug audit` took torch's thread count while `slug demo --audit` used 1: the same patch's audit.json differed
    between the two (and between machines). The embedded models default to 1 thread; --threads overrides."""
    import slugkit.audit
    from slugkit.cli import main

    seen = []
    monkeypatch.setattr(slugkit.audit, "audit_patch", lambda *a, **kw: seen.append(kw["threads"]) or {})
    monkeypatch.setattr("slugkit.cli.audit._print_audit", lambda result, out: 0)
    for extra in ([], ["--threads", "2"]):
        assert main(["audit", "--patch", str(leaky_patch), "--out", str(tmp_path / "o"), *extra]) == 0
    assert seen == [1, 2]


def test_cli_audit_refuses_a_folder_another_run_is_writing(leaky_patch, tmp_path, capsys):
    """`slug audit --out RUN` while another process is writing RUN: the audit would land in the folder about to be
    replaced (new-user trial)."""
    import subprocess
    import sys
    import textwrap

    from slugkit.cli import main

    out = tmp_path / "run"
    code = textwrap.dedent("""
        import sys, time
        from slugkit.common.runfolder import run_folder
        with run_folder(sys.argv[1]) as tmp:
            print("ready", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        for where in (out, out / "sub"):
            assert main(["audit", "--patch", str(leaky_patch), "--out", str(where)]) == 2
            assert f"another slug run is writing {out} (pid {child.pid})" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()


def test_a_tie_at_top1_names_the_variant_with_the_highest_top5():
    """Twenty-third trial: every variant at top-1 0.00 after, and the last listed was named the "worst" while
    another still put the concept in the top 5 on half the images."""
    from slugkit.audit.base import grade_worst

    rows = [{"variant": v, "after": {"top1": 0.0, "top5": t5}} for v, t5 in (("a", 0.10), ("b", 0.48), ("c", 0.0))]
    rec = {}
    assert grade_worst(rec, rows, (0.05, 0.2), "variant", "")["variant"] == "b"
    assert rec["tied"] == 3 and rec["tie_break"] == "highest top-5 after" and rec["status"] == "pass"
    conds = [{"c": c, "after": {"top1": 0.1}} for c in ("fp16", "int4")]  # no top-5 (generated images): last listed
    rec = {}
    assert grade_worst(rec, conds, (0.05, 0.2), "precision", "")["c"] == "int4" and rec["tie_break"] == "last listed"


def test_audit_records_the_weights_it_audited(tmp_path, monkeypatch):
    """audit.json named the model but not the checkpoint a --pretrained audit loaded, and audit.md neither: an audit
    handed on could not say which weights it vouched for (a known item of the trial-38 session)."""
    from slugkit.audit.patch_audit import _said_checkpoint
    from slugkit.audit.report import audit_markdown

    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _said_checkpoint("ck.safetensors") == str(ck.resolve())  # a file: absolute, wherever it is read later
    assert _said_checkpoint("laion400m_e32") == "laion400m_e32" and _said_checkpoint(None) is None
    result = {"concept": "A", "status": "pass", "seconds": 1.0, "probes": [], "model": "ViT-B-32",
              "pretrained": str(ck.resolve())}
    assert f"Model: ViT-B-32 (weights {ck.resolve()}). Time" in audit_markdown(result)
    assert "Model:" not in audit_markdown({**result, "model": None})


def test_an_audit_run_with_its_run_folds_into_the_runs_verdict(tmp_path):
    """Trial 44: `slug demo --concept "Talsa Falham" --audit` exited 4 with the audit failing, while the terminal,
    result.json, report.md's head and the patch (so `slug inspect` and `slug apply`) said pass."""
    import torch

    from slugkit.workflows.audit_fold import fold_audit
    from slugkit.patch import load_patch, make_patch, save_patch
    from slugkit.patch.summary import verdict_line

    run = tmp_path / "run"
    base = {"w": torch.ones(3)}
    save_patch(make_patch(base, {"w": base["w"] * 2}, base_model="toy", adapter="t", concept="A",
                          extra={"verdict": "pass"}), run / "patch")
    (run / "result.json").write_text(json.dumps({"concept": "A", "verdict": {"status": "pass", "reasons": [],
                                                                           "budgets": {}}}))
    (run / "report.md").write_text("# SLUG unlearning report: A\n\n**verdict: pass**\n\nModel: x\n")
    audit = {"status": "fail", "probes": [{"probe": "prompts", "status": "fail", "gating": True},
                                          {"probe": "attack", "status": "fail", "gating": True},
                                          {"probe": "precision", "status": "pass", "gating": True}]}
    assert fold_audit(run, audit)["status"] == "fail"
    res = json.loads((run / "result.json").read_text())
    assert res["verdict"]["status"] == "fail" and res["audit"]["status"] == "fail"
    (reason,) = res["verdict"]["reasons"]
    assert reason["code"] == "audit_fail" and "does not hold: Prompt variants fail, Adversarial prompt search fail" in \
        reason["message"]
    head = (run / "report.md").read_text()
    assert "**verdict: fail**\n- fail: the audit run with this run says the removal does not hold" in head
    assert "verdict: pass" not in head and head.endswith("Model: x\n")
    meta = load_patch(run / "patch").meta
    assert meta["extra"]["verdict"] == "fail" and meta["extra"]["audit"] == "fail"
    assert "the audit run with the run found that the removal does not hold" in verdict_line(run / "patch", meta)
    # before an audit runs it is recorded as unfinished (a Ctrl-C during it left "pass" and no trace: verify 47)
    assert fold_audit(run, {"status": "unfinished", "probes": []})["status"] == "warn"
    assert json.loads((run / "result.json").read_text())["verdict"]["reasons"][0]["code"] == "audit_unfinished"
    # a passing audit: recorded, no reason, the run's own verdict stands (and a second fold replaces the first)
    assert fold_audit(run, {"status": "pass", "probes": []})["status"] == "pass"
    assert json.loads((run / "result.json").read_text())["verdict"]["reasons"] == []
    # a downstream run's banner carries the status and the reason
    (run / "report.md").write_text("> **This run's verdict is the generated images': warn** (section …)\n\n"
                                   "**verdict: fail**\n")
    res["verdict"] = {"status": "warn", "reasons": [{"code": "worst_drop", "severity": "warn", "message": "m"}]}
    (run / "result.json").write_text(json.dumps(res))
    fold_audit(run, {"status": "warn", "probes": [{"probe": "attack", "status": "warn", "gating": True}]})
    text = (run / "report.md").read_text()
    assert text.startswith("> **This run's verdict is the generated images': warn** (the audit run with this run "
                           "says the removal may not hold: Adversarial prompt search warn (audit.md)) (section")


def test_an_audit_of_a_run_folder_says_its_status_under_the_reports_title(tmp_path):
    """Trial 44: the audit section sat at the end of report.md, under a head that read pass; a line under the title
    now says the audit's status, replaced (not repeated) by a later audit."""
    from slugkit.audit.run import write_audit

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# SLUG unlearning report: A\n\n**verdict: pass**\n")
    res = {"concept": "A", "seconds": 1.0, "status": "fail", "probes": []}
    write_audit(res, run)
    write_audit({**res, "status": "pass"}, run)
    lines = (run / "report.md").read_text().split("\n")
    assert lines[:5] == ["# SLUG unlearning report: A", "",
                         "> **Audit: pass** — the removal held (gating probes run: none; section \"Audit\" at the "
                         "end; audit.md). <!-- slug audit: banner -->", "", "**verdict: pass**"]
    assert sum("Audit:" in ln and "banner" in ln for ln in lines) == 1


def test_a_standalone_audit_does_not_replace_the_audit_a_runs_verdict_took_in(leaky_patch, tmp_path, capsys):
    """Verify 45: `slug audit --patch RUN --overwrite` replaced the audit that RUN's verdict cited (fail), and the head
    of report.md then read "Audit: pass" above "verdict: fail"; it is refused, and --out elsewhere works."""
    import shutil

    from slugkit.cli import main

    run = tmp_path / "run"
    shutil.copytree(leaky_patch, run / "patch")
    (run / "result.json").write_text(json.dumps({"audit": {"status": "fail", "file": "audit.json"}}))
    (run / "audit.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        assert main(["audit", "--patch", str(run), "--probes", "precision", "--no-progress", *extra]) == 2
        assert "is a run whose verdict includes the audit run with it" in capsys.readouterr().err
    assert (run / "audit.json").read_text() == "{}"
    assert main(["audit", "--patch", str(run), "--probes", "precision", "--no-progress", "--out",
                 str(tmp_path / "elsewhere")]) == 0


def test_two_audits_into_one_folder_are_one_at_a_time(leaky_patch, tmp_path, capsys):
    """Verify 47: two `slug audit --out SAME` at once both said "wrote", and one's files were the other's. A live
    writer's sentinel refuses the second; a dead writer's is taken over; none is left behind."""
    import subprocess
    import sys

    from slugkit.cli import main

    out = tmp_path / "same"
    mark = tmp_path / ".same.slug-writing"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mark.write_text(str(sleeper.pid))
        args = ["audit", "--patch", str(leaky_patch), "--out", str(out), "--probes", "precision", "--no-progress"]
        assert main(args) == 2
        assert f"another slug audit (pid {sleeper.pid}) is writing to {out}" in capsys.readouterr().err
        assert not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(args) == 0  # its writer is gone: taken over
    assert (out / "audit.json").is_file() and not mark.exists()
