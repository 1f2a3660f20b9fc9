"""``slug demo --target vlm --vlm-fallback finetune``: when SLUG's search refuses, a one-layer fine-tune on the VLM's
answers (:mod:`slugkit.workflows.vlm_layer_ft`; not SLUG), judged by the search's own criteria and labelled as what
it is in result.json, the patch and the report."""

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from slugkit.world import render as world  # noqa: E402
from slugkit.world import vlm  # noqa: E402

FC1 = "vision_model.encoder.layers.2.mlp.fc1.weight"


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    llava, processor = vlm.load_vlm()
    llava.requires_grad_(False)
    return llava, processor


def test_fallback_layers_are_the_deepest_blocks_mlp_then_its_attention_output():
    from slugkit.workflows.vlm_layer_ft import fallback_layers

    names = [f"vision_model.encoder.layers.{i}.{t}.weight" for i in range(3)
             for t in ("self_attn.k_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    assert fallback_layers(names) == [FC1, "vision_model.encoder.layers.2.self_attn.out_proj.weight"]
    assert fallback_layers(names, 3)[2] == names[0]  # then the others, in their order
    assert fallback_layers(["a.weight", "b.weight"]) == ["a.weight", "b.weight"]  # no blocks: the given order


def test_finetune_is_deterministic_restores_the_model_and_lowers_the_name(shipped):
    """Ten Adam steps on one Linear: the same call gives the same displacement bit for bit, only that tensor moves,
    the model is left as it was, and the displacement lowers the target's name probability on its images."""
    from slugkit.patch import tensor_sha256
    from slugkit.slug.search import written
    from slugkit.workflows.vlm_layer_ft import finetune_answers
    from slugkit.world.vlm_train import name_probability

    llava, processor = shipped
    target = world.IDENTITIES[0].name
    params = dict(llava.named_parameters())
    name = next(n for n in params if n.endswith("encoder.layers.2.mlp.fc1.weight"))
    before = {n: tensor_sha256(p) for n, p in params.items()}
    runs = [finetune_answers(llava, processor, {name: params[name]}, [target], ["Hasa Malwick"], steps=10, lr=3e-3,
                             look_alike_images=2, progress=False) for _ in range(2)]
    assert {n: tensor_sha256(p) for n, p in params.items()} == before  # restored, bit for bit
    assert not any(p.requires_grad for p in params.values())
    assert set(runs[0]["delta"]) == {name} and torch.equal(runs[0]["delta"][name], runs[1]["delta"][name])
    assert runs[0]["relative_change"][name] > 0 and runs[0]["data"]["look_alikes"] == ["Hasa Malwick"]
    images = [s.image for s in world.make_samples("pool", "identity", 6, classes=[0])]
    p0 = name_probability(llava, processor, images, target)
    with written(llava, {name: name}, {name: params[name] + runs[0]["delta"][name]}):
        p1 = name_probability(llava, processor, images, target)
    assert sum(p1) < sum(p0) - 0.5, (p0, p1)


def test_finetune_refuses_what_it_cannot_run(shipped):
    from slugkit.workflows.vlm_layer_ft import finetune_answers

    llava, processor = shipped
    with pytest.raises(ValueError, match="no parameters"):
        finetune_answers(llava, processor, {}, ["x"])
    p = dict(llava.named_parameters())
    one = {n: v for n, v in p.items() if n.endswith("layers.2.mlp.fc1.weight")}
    with pytest.raises(ValueError, match="tau"):
        finetune_answers(llava, processor, one, [world.IDENTITIES[0].name], tau=1.0)
    with pytest.raises(ValueError, match="n_forget must be >= 1"):
        finetune_answers(llava, processor, one, [world.IDENTITIES[0].name], n_forget=0)
    with pytest.raises(KeyError):
        finetune_answers(llava, processor, one, ["Nobody Here"])


def test_the_fallback_judges_the_fine_tuned_values_and_hands_back_the_first_accepted(shipped, monkeypatch):
    """The chooser's ``evaluate`` and ``judge`` see the fine-tuned values (θ − 1·g with g = −delta), at step 1 for
    the target and the collateral; the first group that fails is recorded, the next accepted one is returned with
    step 1 and its relative change."""
    from slugkit.workflows import vlm_layer_ft
    from slugkit.workflows.gen_search import judged
    from slugkit.workflows.sd_demo import embedded_hf_adapter

    llava, processor = shipped
    ad = embedded_hf_adapter()
    ad.restrict_candidates([n for n in ad.candidate_names() if ".layers.2." in n and "vision" in n], consumer="test")
    from slugkit.integrations.llava import verify_vision_tower

    mapping = verify_vision_tower(ad.model, llava)  # CLIP name -> the VLM's
    names = ad.candidate_names()
    deltas = {}

    calls = []

    def fake_finetune(llava_, processor_, params, targets, look_alikes, **kw):
        calls.append(kw)
        assert list(look_alikes) == ["Hasa Malwick"]
        back = {v: k for k, v in mapping.items()}
        deltas.update({back[n]: 0.1 * p.detach().clone() for n, p in params.items()})  # a relative change of 0.1
        return {"delta": {n: deltas[back[n]] for n in params}, "relative_change": {n: 0.1 for n in params},
                "final_loss": {"forget": 0.0, "retain": 0.1}, "train_s": 0.0, "data": {}}

    seen = []

    def evaluate(group, eta, g, scale, label):
        seen.append((tuple(group), eta, scale))
        assert label == "the fine-tuned values"  # the SD scorer prints it for "step 1" (verification 65)
        assert all(torch.equal(g[n], -deltas[n]) for n in group)
        return (0.0 if FC1 in group else 0.5), 0.01, 0.05, "Hasa Malwick", 0.01  # only the MLP forgets

    monkeypatch.setattr(vlm_layer_ft, "finetune_answers", fake_finetune)
    monkeypatch.setattr(ad, "candidate_names", lambda: [n for n in names if "out_proj" in n or "fc1" in n])
    chosen, g, rec = vlm_layer_ft.finetune_fallback(
        llava, processor, mapping, ad, [world.IDENTITIES[0].name], ["Hasa Malwick"], evaluate,
        lambda eta, res: judged(eta, res, 0.05, 0.05, 0.2, 0.03), progress=False)
    assert seen[0] == (tuple(ad.group_of(FC1)), 1.0, 1.0)
    assert chosen.name == FC1 and chosen.step_size == 1.0 and abs(chosen.step_size / chosen.ratio - 0.1) < 1e-6
    assert rec["accepted"] == FC1 and rec["tried"][0]["accepted"] and set(g) == set(ad.group_of(FC1))
    assert calls[-1]["steps"] == vlm_layer_ft.FT_STEPS and "forget_batch" not in calls[-1]  # its own default, 32
    assert "300 Adam steps at 0.001, the target's name" in rec["summary"]
    # a joint run (several targets, one edit): longer, on larger forget batches, and said so
    chosen, g, rec = vlm_layer_ft.finetune_fallback(
        llava, processor, mapping, ad, [i.name for i in world.IDENTITIES[:2]], ["Hasa Malwick"], evaluate,
        lambda eta, res: judged(eta, res, 0.05, 0.05, 0.2, 0.03), progress=False)
    joint = (vlm_layer_ft.JOINT_STEPS, vlm_layer_ft.JOINT_FORGET_BATCH)
    assert (calls[-1]["steps"], calls[-1]["forget_batch"]) == joint
    assert (rec["steps"], rec["forget_batch"]) == (900, 64) and chosen.name == FC1
    assert "900 Adam steps at 0.001, forget batches of 64, the targets' names" in rec["summary"]
    # nothing forgets: the record says so and the refusal clause names each tried group
    monkeypatch.setattr(ad, "candidate_names", lambda: [n for n in names if "out_proj" in n])
    chosen, g, rec = vlm_layer_ft.finetune_fallback(
        llava, processor, mapping, ad, [world.IDENTITIES[0].name], ["Hasa Malwick"], evaluate,
        lambda eta, res: judged(eta, res, 0.05, 0.05, 0.2, 0.03), progress=False)
    assert chosen is None and g is None and "accepted" not in rec
    from slugkit.workflows.layer_ft import finetune_refusal

    said = finetune_refusal(rec, "--vlm-fallback finetune")
    assert "out_proj" in said and "did not pass either" in said


def test_fallback_needs_a_known_name_and_runs_after_the_slug_rounds(tmp_path, capsys):
    """An unknown fallback is refused before any work; ``finetune`` beside ``max_layers`` 2 is not (it was: the
    fine-tune took the second SLUG layer's place, so turning it on replaced two-layer SLUG passes by fine-tunes) —
    the chooser hands it to :func:`slugkit.workflows.rounds.generator_rounds` as ``choose.fallback``."""
    from slugkit.cli import main
    from slugkit.workflows.vlm_demo import run_vlm_demo, vlm_chooser

    with pytest.raises(ValueError, match="fallback"):
        vlm_chooser(["x"], None, None, {}, [], fallback="retrain")
    with pytest.raises(ValueError, match="fallback"):
        run_vlm_demo("Jowen Gormere", tmp_path / "r", fallback="retrain")
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(["demo", "--target", "vlm", "--vlm-fallback", "retrain", "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    assert "invalid choice: 'retrain'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
    name = world.IDENTITIES[0].name
    assert callable(vlm_chooser([name], None, None, {}, [], fallback="finetune", max_layers=2).fallback)
    assert not hasattr(vlm_chooser([name], None, None, {}, [], max_layers=2), "fallback")


@pytest.mark.slow
def test_a_refused_slug_run_passed_by_the_fine_tune_is_labelled_so(tmp_path, monkeypatch, capsys):
    """End to end with the real fine-tune (3 steps at a large rate, so it forgets), SLUG's VLM search made to refuse
    and the collateral budgets open: the run's result.json, run.json, patch and report say ``layer-finetune``,
    the patch holds the fine-tuned values of one group, and it applies through the LLaVA integration."""
    from slugkit.cli import main
    from slugkit.patch import load_patch
    from slugkit.workflows import vlm_demo, vlm_layer_ft

    def refused(evaluate, start, *a, **k):  # a step that lowers the naming within half the budgets: a partial step
        return [{"step_size": start, "target_recognised": 0.5, "other_drop": 0.0, "accepted": False,
                 "neighbour_drop": 0.0, "worst_neighbour": None, "utility_drop": 0.0}], None

    monkeypatch.setattr(vlm_demo, "generator_step_search", refused)
    from slugkit.slug import search

    choose = search.choose_layer

    def attention_first(found, *a):  # a group of several tensors (q, k, v) searched first, for the stage lines
        qkv = [s for s in found if len(s.group) == 3]
        return qkv[0] if qkv else choose(found, *a)

    monkeypatch.setattr(search, "choose_layer", attention_first)
    monkeypatch.setattr(vlm_layer_ft, "FT_STEPS", 3)
    monkeypatch.setattr(vlm_layer_ft, "FT_LR", 0.05)
    out = tmp_path / "ft"
    rc = main(["demo", "--target", "vlm", "--vlm-fallback", "finetune", "--out", str(out), "--other-budget", "1",
               "--neighbour-budget", "1", "--vlm-utility-budget", "1", "--max-searched", "1"])
    said, err = capsys.readouterr()
    res = json.loads((out / "result.json").read_text())
    assert rc == {"pass": 0, "warn": 3, "fail": 4}[res["verdict"]["status"]]
    fb = res["chooser"]["fallback"]
    assert res["method"] == "layer-finetune" and res["layer"] == fb["accepted"] and res["step_size"] == 1.0
    assert fb["steps"] == 3 and fb["tried"][-1]["accepted"] and fb["tried"][0]["layer"] == FC1  # the MLP first
    assert [t["accepted"] for t in fb["tried"]] == [False] * (len(fb["tried"]) - 1) + [True]
    assert res["chooser"]["policy"].startswith("SLUG refused; one-layer fine-tune")
    # SLUG's two rounds ran first (round 1's partial step, then a refusal on the edited model); the fine-tune ran on
    # the unedited model: the patch's originals are the shipped CLIP's, not the partial step's
    rounds = res["chooser"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["partial_step"]["target_recognised"] == 0.5
    from slugkit.world.vlm import vlm_clip_adapter

    adapter = vlm_clip_adapter(None)
    unedited = dict(adapter.model.named_parameters())
    # the stage lines name every tensor of a group (they named its first: verification 61)
    group = ", ".join(adapter.group_of(rounds[0]["vlm_search"]["layers"][0]["layer"]))
    assert group.count(", ") == 2  # q, k, v
    assert f"VLM step search on {group} from step" in err and f"round 2: partial step of {group};" in err
    assert res["vlm"]["after"]["target_named"] < res["vlm"]["before"]["target_named"]
    assert json.loads((out / "run.json").read_text())["vlm"]["fallback"] == "finetune"
    patch = load_patch(out / "patch")
    assert patch.meta["method"] == "layer-finetune" and "not SLUG" in patch.meta["extra"]["edit"]
    assert patch.names == sorted(res["group"]) == sorted(fb["tried"][-1]["group"])  # at the fine-tuned values
    assert all(torch.equal(patch.original[n], unedited[n].detach()) for n in patch.names)
    for n in patch.names:
        moved = float((patch.patched[n] - patch.original[n]).norm() / patch.original[n].norm())
        assert abs(moved - fb["tried"][-1]["relative_change"][n]) < 1e-4 * max(moved, 1)
    report = (out / "report.md").read_text()
    assert "**Not SLUG: method layer-finetune.**" in report.split("## ")[0]  # at the top, before any section
    assert "fine-tuned `" + " + ".join(res["group"]) + "`" in report
    assert "# layer-finetune unlearning report" in report and "method: A one-layer fine-tune (NOT SLUG" in report
    assert "step 1," not in report and "applied the fine-tuned values (not a SLUG step) of" in report
    assert f"- **round 1**: partial step {rounds[0]['partial_step']['applied_step']:.4g} of `" in report
    assert "tried (not in the patch)" in report and "` kept" not in report
    assert "Apply it: `slug apply --llava embedded --patch patch/ --out ../ft-vlm` in this folder" in report
    traj = report.split("## Search trajectory of the first edited layer")[1].split("## ")[0]
    assert "None of these steps was applied" in traj or (  # no SLUG step rule for the fine-tuned group
        " + ".join(f"`{n}`" for n in res["group"]) + " were not searched" in traj and "applied step =" not in traj)
    assert "A row marked **(edited)**, if any, is the fine-tuned layer" in report
    assert "SLUG's own refusal, before the fine-tune: " in report and "(no patch)" not in report
    assert "Cost of the whole run: SLUG + the fine-tune" in report and "Step projected off" not in report
    assert len(res["layers_edited"]) == 1 and "not SLUG" in res["layers_edited"][0]["why"]
    assert "\nA one-layer fine-tune (NOT SLUG: SLUG's search refused" in said and "time: SLUG + the fine-tune" in said
    assert "(the fine-tuned values, not a SLUG step) of its CLIP vision tower" in said and "(step 1)" not in said
    hint = f"apply the patch: slug apply --llava embedded --patch {out}/patch --out {out}-vlm"  # runs as printed
    assert f"; {hint}\n" in said and " (VLM_DIR" not in said
    # carried into a VLM folder: its record says which method made the patch
    capsys.readouterr()
    assert main(["apply", "--llava", "embedded", "--patch", str(out / "patch"), "--out", str(out)]) == 2
    assert "is a slug run folder; write the LLaVA model outside that run" in capsys.readouterr().err  # not "holds
    # files slug did not write" of the run's own files (verification 62)
    assert main(hint.split()[4:]) == 0  # the console's command, as printed
    assert json.loads((tmp_path / f"{out.name}-vlm" / "slugkit_patch.json").read_text())["method"] == "layer-finetune"
