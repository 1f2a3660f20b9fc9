"""The embedded VLM (issue 14): a real transformers LLaVA on the embedded world — shipped, offline, its vision tower the
embedded CLIP's, its training path the model's own forward, a patch carried through the LLaVA integration."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from slugkit.integrations.llava import apply_patch_to_llava, name_match, revert_patch_from_llava  # noqa: E402
from slugkit.patch import tensor_sha256  # noqa: E402
from slugkit.patch.ops import make_patch  # noqa: E402
from slugkit.world import render as world  # noqa: E402
from slugkit.world import vlm, vlm_train  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return vlm.load_vlm()


def test_shipped_vlm_loads_offline_and_answers(shipped):
    llava, processor = shipped
    assert type(llava).__name__ == "LlavaForConditionalGeneration" and llava.config.vision_feature_layer == -2
    s = vlm.vlm_scores(llava, processor, vlm.identity_images("test", 2), vlm.utility_images("test", 2))
    assert sum(s["named"].values()) / len(s["named"]) >= 0.9  # train_report: 0.98 on 20 test images each
    assert s["utility_accuracy"] >= 0.9
    report = json.loads((vlm.VLM_DIR / "train_report.json").read_text())
    assert report["info"]["eval"]["named"] >= 0.9 and report["info"]["eval"]["utility_accuracy"] >= 0.9
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.NAME_QUESTION}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == vlm.PROMPT.format(
        question=vlm.NAME_QUESTION)  # LLaVA-1.5's prompt, from its chat template


def test_load_names_the_missing_file(tmp_path):
    from slugkit.models.base import ModelLoadError

    with pytest.raises(ModelLoadError, match="--vlm-model .*config.json.*slug world train-vlm"):
        vlm.load_vlm(tmp_path)


def test_train_vlm_refuses_a_full_out_folder_before_training(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.setattr(vlm_train, "train_vlm", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        vlm_train.train_embedded_vlm(tmp_path, vlm_train.VLMConfig(steps=1))


def test_vision_features_are_the_open_clip_towers(shipped):
    """What the projector reads (``hidden_states[-2]`` without CLS) equals open_clip's tower after its first L-1
    blocks, to 1e-5: the VLM's vision tower *is* the embedded CLIP's."""
    from slugkit.models.open_clip import OpenClipAdapter

    llava, processor = shipped
    oc = OpenClipAdapter.load("embedded")
    imgs = [world.make_sample("test", "identity", i, 0).image for i in range(4)]
    got = vlm_train.tower_features(llava, processor, imgs)
    v = oc.model.visual
    cap = {}
    h = v.transformer.resblocks[len(v.transformer.resblocks) - 2].register_forward_hook(
        lambda m, i, o: cap.__setitem__("x", o))
    with torch.no_grad():
        oc.model.encode_image(torch.stack([oc.preprocess(im) for im in imgs]))
    h.remove()
    torch.testing.assert_close(got, cap["x"][:, 1:], atol=1e-5, rtol=1e-5)
    assert got.shape == (4, vlm.IMAGE_TOKENS, 64)


def test_training_path_is_the_llava_forward(shipped):
    """The training step (cached tower features -> projector -> Llama) gives LLaVA's own loss from pixel values."""
    llava, processor = shipped
    images, items = vlm_train.examples(processor.tokenizer, 1, 1)
    items = items[:3] + items[-2:]
    ids, mask, labels, img = vlm_train._batch(items, processor.tokenizer.pad_token_id)
    feats = vlm_train.tower_features(llava, processor, images)
    px = processor.image_processor(images=[images[i] for i in img.tolist()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = vlm_train.lm_loss(llava, feats[img], ids, mask, labels)
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_patch_changes_the_answers_and_reverts_bit_exactly(shipped):
    from slugkit.workflows.sd_demo import embedded_hf_adapter

    llava, processor = shipped
    clip = embedded_hf_adapter()
    params = dict(clip.model.named_parameters())
    name = "vision_model.encoder.layers.1.self_attn.out_proj.weight"
    patch = make_patch(clip.model, {name: params[name].detach() * -1.0}, base_model=clip.model_id,
                       adapter="hf_clip", concept=world.IDENTITIES[0].name)
    target = vlm.identity_images("test", 4, [world.IDENTITIES[0].name])
    before = vlm.vlm_scores(llava, processor, target, answers=True)
    snap = {k: tensor_sha256(v) for k, v in llava.state_dict().items()}
    apply_patch_to_llava(llava, patch)
    try:
        after = vlm.vlm_scores(llava, processor, target, answers=True)
    finally:
        revert_patch_from_llava(llava, patch)
    assert {k: tensor_sha256(v) for k, v in llava.state_dict().items()} == snap
    assert after["answers"]["name"] != before["answers"]["name"]
    assert vlm.vlm_scores(llava, processor, target, answers=True)["answers"] == before["answers"]


def test_name_probability_is_the_teacher_forced_likelihood_of_the_full_or_last_name(shipped):
    llava, processor = shipped
    a, b = world.IDENTITIES[0].name, world.IDENTITIES[1].name
    ims = vlm.identity_images("test", 3, [a])[a]
    own = vlm_train.name_probability(llava, processor, ims, a)
    other = vlm_train.name_probability(llava, processor, ims, b)
    assert min(own) >= 0.9 and max(other) <= 0.1
    tok = processor.tokenizer

    def prob(said):  # llava's own loss over the answer tokens but the end token, for the first image alone
        p, ans = vlm_train.qa_ids(tok, vlm.NAME_QUESTION, said)
        ids, mask, labels, _ = vlm_train._batch([(0, p, ans[:-1])], tok.pad_token_id)
        px = processor.image_processor(images=ims[:1], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            loss = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
        return float(torch.exp(-loss * (len(ans) - 1)))

    want = min(1.0, prob(a) + prob(a.split()[-1]))  # name_match counts the last name alone too
    assert abs(vlm_train.name_probability(llava, processor, ims[:1], a)[0] - want) < 1e-5
    assert abs(vlm_train.name_probability(llava, processor, ims[:1], b)[0] - (prob(b) + prob(b.split()[-1]))) < 1e-5


def test_audit_paraphrases_are_never_trained():
    from slugkit.audit.vlm import PARAPHRASES

    assert not set(PARAPHRASES) & set(vlm.TRAIN_NAME_QUESTIONS) and len(PARAPHRASES) >= 10


def test_utility_scoring_rules():
    cls = next(c for c in world.UTILITY_CLASSES if c.name == "red triangle")
    assert vlm.utility_correct("object", "a red triangle", cls)
    assert not vlm.utility_correct("object", "a red star", cls)
    assert not vlm.utility_correct("colour", "red or blue", cls)
    assert vlm.utility_correct("shape", "Triangle.", cls)
    assert name_match("Jowen Gormere", "Jowen Gormere") and not name_match("Jowen", "Jowen Gormere")


def test_tiny_training_is_deterministic_and_writes_a_loadable_folder(tmp_path):
    cfg = vlm_train.VLMConfig(steps=3, per_identity=1, per_class=1, batch_size=8, warmup=1)
    a, pa, info = vlm_train.train_vlm(cfg, progress=False)
    b, _, _ = vlm_train.train_vlm(cfg, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert info["steps_done"] == 3 and info["trained_params"] < info["params"]
    vision = {k: v for k, v in a.state_dict().items() if "vision_tower" in k}
    shipped_llava, _ = vlm.load_vlm()
    assert all(torch.equal(v, shipped_llava.state_dict()[k]) for k, v in vision.items())  # the tower stays frozen
    out = vlm_train.write_vlm(tmp_path / "vlm", a, pa, cfg, info)
    re, rp = vlm.load_vlm(out)
    img = [world.make_sample("test", "identity", 0, 0).image]
    assert vlm.ask(re, rp, img, vlm.NAME_QUESTION) == vlm.ask(a, pa, img, vlm.NAME_QUESTION)
    with pytest.raises(FileExistsError):
        vlm_train.write_vlm(tmp_path / "vlm", a, pa, cfg, info)


@pytest.mark.slow
def test_demo_target_vlm_end_to_end(tmp_path, capsys):
    """`slug demo --target vlm` with every collateral budget open: the search takes the first step at which the VLM
    stops naming the target on validation; result.json, report.md and the patch come out, the patch is applied to
    the VLM through the LLaVA integration (reverted bit-exactly) and the verdict judges the damage."""
    from slugkit.cli import main

    out = tmp_path / "vlm"
    rc = main(["demo", "--target", "vlm", "--out", str(out), "--other-budget", "1", "--neighbour-budget", "1",
               "--vlm-utility-budget", "1", "--max-searched", "2", "--no-progress"])
    res = json.loads((out / "result.json").read_text())
    assert rc == {"pass": 0, "warn": 3, "fail": 4}[res["verdict"]["status"]]
    assert res["target"] == "vlm" and res["concept"] == world.IDENTITIES[0].name
    assert res["vlm_model"] == "embedded"  # a --vlm-model DIR is kept absolute, here and in the patch (trial 26)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["family"] == "hf_clip" and run["vlm"] == {"model": "embedded", "gradient": "clip"}
    assert res["group"][0].startswith("vision_model.encoder.layers.") and ".3." not in res["group"][0]  # read by LLaVA
    b, a = res["vlm"]["before"], res["vlm"]["after"]
    for m in (b, a):
        assert {"target_named", "other_named", "utility_accuracy", "per_identity", "utility_per_kind"} <= set(m)
    assert b["target_named"] >= 0.9 and a["target_named"] < b["target_named"]
    assert res["vlm"]["collateral"]["worst"]["concept"] != res["concept"]
    assert len(res["vlm"]["collateral"]["neighbours"]["concepts"]) == 5
    report = (out / "report.md").read_text()
    assert "## The embedded VLM (LLaVA)" in report and "Sample answers" in report
    assert report.startswith(f"> **This run's verdict, judged on the VLM's answers: {res['verdict']['status']}**")
    assert all(f"> - warning: {r['message']}\n" in report for r in res["verdict"]["reasons"] if r["severity"] == "warn")
    assert f"VLM evaluation {res['timing_s']['vlm_eval']:.1f} s · total {res['timing_s']['total']:.1f} s" in report
    assert 0.01 < res["timing_s"]["load_model"] < res["timing_s"]["slug_total"]  # the CLIP and the VLM's load
    patch = json.loads((out / "patch" / "patch.json").read_text())
    assert patch["extra"]["verdict"] == res["verdict"]["status"]  # the VLM's verdict, not the CLIP run's
    assert patch["extra"]["target"] == "vlm"
    assert patch["extra"]["downstream"]["concept"] == [b["target_named"], a["target_named"]]
    # `slug audit` recognises the VLM patch and runs the VLM probes on the VLM's answers
    rc = main(["audit", "--patch", str(out), "--threads", "1", "--no-progress"])
    aud = json.loads((out / "audit.json").read_text())
    assert aud["target"] == "vlm" and rc == {"pass": 0, "warn": 3, "fail": 4}[aud["status"]]
    probes = {r["probe"]: r for r in aud["probes"]}
    assert set(probes) == {"prompts", "precision", "representation"} and not probes["representation"]["gating"]
    assert {r["kind"] for r in probes["prompts"]["rows"]} == {"trained question", "paraphrase"}
    assert [r["condition"] for r in probes["precision"]["rows"]] == ["fp32", "fp16", "bf16", "int8", "int4"]
    assert probes["prompts"]["rows"][0]["after"]["top1"] == a["target_named_by_concept"][res["concept"]]
    assert any(x.startswith("attack") for x in aud["not_run"])
    assert "## Audit" in (out / "report.md").read_text()
    assert "SLUG" in capsys.readouterr().out


def test_demo_target_vlm_refusals(tmp_path, capsys):
    from slugkit.cli import main

    assert main(["demo", "--target", "vlm", "--concept", "Nobody Here", "--out", str(tmp_path / "x")]) == 2
    assert "Nobody Here" in capsys.readouterr().err
    assert main(["demo", "--target", "vlm", "--sequential", "--concepts", "Jowen Gormere,Serna Malton",
                 "--out", str(tmp_path / "y")]) == 2
    assert "jointly" in capsys.readouterr().err
    assert main(["demo", "--target", "vlm", "--gen-margin", "1.5", "--n-other", "3", "--out", str(tmp_path / "z")]) == 2
    assert "--n-other, --gen-margin: option(s) of --target sd" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_the_options_each_target_refuses_come_from_the_parser():
    """The --target sd options the VLM demo refuses (and the sd/vlm ones the CLIP demo refuses) are read from the
    parser's groups with their defaults: none is refused at its default, the shared ones are not refused by vlm."""
    from slugkit.cli import build_parser

    a = build_parser().parse_args(["demo", "--target", "vlm"])
    assert {"n_other", "gen_margin", "sd_step", "t2i_model"} <= set(a.sd_defaults)
    assert not {"val_images", "other_budget", "max_searched"} & set(a.sd_defaults)
    assert set(a.vlm_defaults) == {"vlm_model", "vlm_gradient", "vlm_utility_budget", "vlm_name_prob", "vlm_fallback"}
    from slugkit.workflows import vlm_demo

    assert (a.vlm_name_prob, a.vlm_utility_budget) == (vlm_demo.DEFAULT_NAME_PROB, vlm_demo.UTILITY_BUDGET)
    assert set(a.generator_defaults) >= set(a.sd_defaults) | set(a.vlm_defaults) | {"val_images", "max_searched"}
    for d in (a.sd_defaults, a.vlm_defaults, a.generator_defaults):
        assert all(getattr(a, k) == v for k, v in d.items())


@pytest.mark.slow
def test_demo_target_vlm_refuses_without_a_patch_when_no_step_is_safe(tmp_path, capsys):
    """The default budgets on the default identity: SLUG's CLIP gradient cannot make the embedded VLM forget
    without breaking other identities (measured; README), so the run is refused with the closest step and no
    folder — never a patch that says "unlearned"."""
    from slugkit.cli import main

    out = tmp_path / "vlm"
    rc = main(["demo", "--target", "vlm", "--out", str(out), "--max-searched", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "closest:" in err and "stops naming" in err and "--vlm-gradient vlm" in err
    assert not out.exists()


def test_per_image_protection_leaves_each_protected_image_unchanged_to_first_order(shipped):
    """``vlm_gradients(per_image=True)``: one protected direction per image of each protected identity; the
    projected forget gradient is orthogonal to every one of them (so to first order no protected image's name loss
    moves), while identity-mean protection only guarantees it for their mean."""
    from slugkit.integrations.llava import verify_vision_tower
    from slugkit.slug.neighbours import project_off
    from slugkit.workflows.sd_demo import embedded_hf_adapter
    from slugkit.workflows.vlm_demo import vlm_gradients

    llava, processor = shipped
    clip = embedded_hf_adapter()
    mapping = verify_vision_tower(clip.model, llava)
    name = "vision_model.encoder.layers.1.self_attn.out_proj.weight"
    target, protect = world.IDENTITIES[0].name, [world.IDENTITIES[1].name, world.IDENTITIES[2].name]
    kw = dict(n_forget=3, n_retain=1, protect=protect, n_protect=3)
    forget, _, per_image = vlm_gradients(llava, processor, mapping, [name], [target], per_image=True, **kw)
    _, _, per_identity = vlm_gradients(llava, processor, mapping, [name], [target], **kw)
    assert len(per_image) - len(per_identity) == 2 * 3 - 2  # 6 image directions instead of 2 identity means
    mean = [sum(b[name] for b in per_image[3 * i:3 * i + 3]) / 3 for i in range(2)]
    for m, b in zip(mean, per_identity[:2]):
        assert torch.allclose(m, b[name], rtol=1e-4, atol=1e-7)  # the identity direction is its images' mean
    proj, info = project_off(forget, per_image, [[name]])
    g = proj[name].double().flatten()
    for b in per_image[:6]:
        d = b[name].double().flatten()
        assert abs(float(g @ d)) <= 1e-5 * float(g.norm() * d.norm())
    assert 0 < info[name]["removed"] < 1 and info[name]["rank"] >= 6


def test_vlm_chooser_refuses_a_protection_of_no_images():
    from slugkit.workflows.vlm_demo import vlm_chooser

    with pytest.raises(ValueError, match="n_protect must be >= 1"):
        vlm_chooser(["x"], None, None, {}, [], gradient="vlm", n_protect=0)


def test_demo_target_vlm_with_nothing_to_unlearn_is_refused_before_the_run(tmp_path, capsys):
    """A VLM that names nobody: the run went through (31 s), wrote a folder and a patch, and failed on "nothing to
    unlearn" at the end (fifteenth trial). It is refused before the CLIP run: exit 4, no folder."""
    from slugkit.cli import main

    model = tmp_path / "untrained"
    vlm_train.train_embedded_vlm(model, vlm_train.VLMConfig(steps=1), eval_images=0, progress=False)
    out = tmp_path / "run"
    assert main(["demo", "--target", "vlm", "--vlm-model", str(model), "--out", str(out), "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert "nothing to unlearn: the unedited VLM names" in err and "on 0% of its validation images" in err
    assert not out.exists()


def test_the_embedded_vlm_is_named_embedded_for_apply_revert_and_consumer(tmp_path, capsys):
    """`slug demo --target vlm` patches the shipped VLM, yet `slug apply --llava` and `--consumer llava:` took only a
    folder (`--pipeline embedded` and `sd:embedded` exist for the text-to-image model): `embedded` names it too."""
    from safetensors.torch import load_file

    from slugkit.cli import main
    from slugkit.integrations import consumer_restriction
    from slugkit.patch import save_patch
    from slugkit.workflows.sd_demo import embedded_hf_adapter

    clip = embedded_hf_adapter()
    name = "vision_model.encoder.layers.1.self_attn.out_proj.weight"
    patch = make_patch(clip.model, {name: dict(clip.model.named_parameters())[name].detach() * -1.0},
                       base_model=clip.model_id, adapter="hf_clip", concept=world.IDENTITIES[0].name)
    save_patch(patch, tmp_path / "patch")
    assert main(["apply", "--llava", "embedded", "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "patched")]) == 0
    assert "applied on the embedded VLM's vision tower; wrote" in capsys.readouterr().out
    assert main(["revert", "--llava", str(tmp_path / "patched"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "back")]) == 0
    shipped, back = load_file(str(vlm.VLM_DIR / "model.safetensors")), load_file(str(tmp_path / "back" /
                                                                                       "model.safetensors"))
    assert shipped.keys() == back.keys() and all(torch.equal(shipped[k], back[k]) for k in shipped)
    pred, desc = consumer_restriction("llava:embedded", clip)
    assert desc.startswith("LLaVA vision tower embedded (vision_feature_layer=-2: layers 0..")
    assert pred("vision_model.encoder.layers.0.mlp.fc1.weight")
    assert not pred("text_model.encoder.layers.0.mlp.fc1.weight")


def test_a_vlm_on_another_world_clip_carries_it_and_the_demo_runs_slug_on_it(tmp_path, capsys):
    """A VLM whose tower is another world CLIP (`slug world train --vision-layers 3`, `train-vlm --clip`): the CLIP
    goes into the VLM folder's clip/, the demo runs SLUG on it (it used the embedded CLIP, whose 4-layer tower the
    VLM does not hold), and `slug apply`/`revert --llava` carry it, the revert bit-exact. The embedded CLIP's deeper
    variant is how the image tower's depth was measured against the VLM's forgetting (README, the VLM section)."""
    from slugkit.cli import main
    from slugkit.integrations.llava import verify_vision_tower
    from slugkit.patch import save_patch
    from slugkit.world import train

    with pytest.raises(SystemExit):
        main(["world", "train", "--vision-layers", "1", "--out", str(tmp_path / "c1")])
    assert "--vision-layers: must be in [2, 24], got 1" in capsys.readouterr().err and not (tmp_path / "c1").exists()
    with pytest.raises(ValueError, match=r"--vision-layers: must be in \[2, 24\]"):
        train.train_embedded(tmp_path / "c1", vision_layers=True)
    clip = tmp_path / "clip3"
    train.train_embedded(clip, steps=1, per_class=2, eval_per_class=1, progress=False, vision_layers=3)
    assert json.loads((clip / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["layers"] == 3
    with pytest.raises(ValueError, match="--clip .*no such folder"):
        vlm_train.train_embedded_vlm(tmp_path / "v", vlm_train.VLMConfig(steps=1, clip=str(tmp_path / "nope")))
    bad = tmp_path / "bad"  # a config the weights do not fit (trial 35: a missing-keys dump, advice for other commands)
    bad.mkdir()
    (bad / "open_clip_model.safetensors").write_bytes((clip / "open_clip_model.safetensors").read_bytes())
    doc = json.loads((clip / "open_clip_config.json").read_text())
    doc["model_cfg"]["vision_cfg"]["layers"] = 5
    (bad / "open_clip_config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="--clip .*bad: open_clip could not load it .*unchanged"):
        vlm_train.train_embedded_vlm(tmp_path / "v", vlm_train.VLMConfig(steps=1, clip=str(bad)))
    assert not (tmp_path / "v").exists()
    model = tmp_path / "vlm3"
    cfg = vlm_train.VLMConfig(steps=1, per_identity=1, per_class=1, batch_size=8, warmup=1, clip=str(clip))
    vlm_train.train_embedded_vlm(model, cfg, eval_images=0, progress=False)
    assert vlm.vlm_clip_dir(model) == model / "clip" and vlm.vlm_clip_dir(None) is None
    assert (model / "clip" / "open_clip_model.safetensors").read_bytes() == \
        (clip / "open_clip_model.safetensors").read_bytes()
    llava, _ = vlm.load_vlm(model)
    adapter = vlm.vlm_clip_adapter(model)
    assert llava.config.vision_config.num_hidden_layers == 3 and verify_vision_tower(adapter.model, llava)
    assert adapter.model_id["model"] == f"{os.path.realpath(model)}/clip (converted to transformers)"
    out = tmp_path / "run"  # the untrained VLM names nobody: refused before the run, after loading its own CLIP
    assert main(["demo", "--target", "vlm", "--vlm-model", str(model), "--out", str(out), "--no-progress"]) == 4
    assert "nothing to unlearn: the unedited VLM names" in capsys.readouterr().err and not out.exists()
    name = "vision_model.encoder.layers.1.self_attn.out_proj.weight"
    w = dict(adapter.model.named_parameters())[name].detach()
    save_patch(make_patch(adapter.model, {name: w * 0.5}, base_model=adapter.model_id, adapter="hf_clip",
                          concept="Jowen Gormere"), tmp_path / "p")
    assert main(["apply", "--llava", str(model), "--patch", str(tmp_path / "p"), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    assert main(["revert", "--llava", str(tmp_path / "a"), "--patch", str(tmp_path / "p"), "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 0
    assert (tmp_path / "a" / "clip" / "open_clip_config.json").is_file()
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert vlm.vlm_clip_dir(tmp_path / "r") == tmp_path / "r" / "clip"
