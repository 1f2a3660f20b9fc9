"""Command-line manners (trust cases A1, A2, A4, A6, C, F): values that make a run meaningless are refused at parse
time with one line naming the flag; every option says what it does; --version; the curate --retain rename."""

import argparse
import json
import os

import pytest

from slugkit.cli import build_parser, main


@pytest.mark.parametrize("argv,flag", [
    (["demo", "--threshold", "1"], "--threshold"),  # A1: FA can never drop below 1
    (["demo", "--threshold", "-0.1"], "--threshold"),
    (["demo", "--concept", ""], "--concept"),  # A4: an unset shell variable
    (["demo", "--concept", "   "], "--concept"),
    (["demo", "--concepts", ","], "--concepts"),
    (["demo", "--batch-size", "1"], "--batch-size"),  # A6: a one-pair retain batch has a zero gradient
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--batch-size", "-1"], "--batch-size"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--threads", "-1"], "--threads"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--margin", "0.5"], "--margin"),
    (["demo", "--margin", "inf"], "--margin"),
    (["demo", "--threshold", "nan"], "--threshold"),
    (["demo", "--utility-budget", "2"], "--utility-budget"),
    (["demo", "--worst-budget", "-0.1"], "--worst-budget"),
    (["demo", "--worst-budget", "abc"], "--worst-budget"),
    (["demo", "--max-layers", "0"], "--max-layers"),
    (["demo", "--max-layers", "4"], "--max-layers"),
    (["unlearn", "--protect-neighbours", "-1", "--out", "x", "--concept", "A"], "--protect-neighbours"),
    (["unlearn", "--identity-template", "a photo", "--out", "x", "--concept", "A"], "--identity-template"),  # A2
    (["unlearn", "--forget-samples", "0", "--out", "x", "--concept", "A"], "--forget-samples"),
    (["grads", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["compare", "--lr", "gaft=abc"], "--lr"),
    (["compare", "--lr", "gaft"], "--lr"),
    # --lr-sweep: 0 ran, -1 failed in torch after 15 s, abc named no option (eleventh trial)
    (["compare", "--lr-sweep", "0,1"], "--lr-sweep"),
    (["compare", "--lr-sweep", "-1"], "--lr-sweep"),
    (["compare", "--lr-sweep", "abc"], "--lr-sweep"),
    (["compare", "--lr-sweep", "1e-4,1e-4"], "--lr-sweep"),
    (["compare", "--lr-sweep", "1e-4,,3e-4"], "--lr-sweep"),
    (["curate", "--shards", "s", "--concept", "", "--out", "o"], "--concept"),
    (["audit", "--patch", "p", "--attack-iterations", "0"], "--attack-iterations"),
    (["audit", "--patch", "p", "--alias", ""], "--alias"),
    (["audit", "--patch", "p", "--control-name", " "], "--control-name"),
    (["demo", "--target", "sd", "--max-searched", "0"], "--max-searched"),
    # comma lists: empty ran nothing and exited 0; a repeated item counted twice (new-user trial)
    (["compare", "--methods", ""], "--methods"),
    (["compare", "--methods", ","], "--methods"),
    (["compare", "--methods", "slug,ft,SLUG"], "--methods"),
    (["compare", "--concepts", "A,A"], "--concepts"),
    (["demo", "--concepts", "Jowen Gormere,,Serna Malton"], "--concepts"),  # the empty item was dropped (fifth trial)
    (["demo", "--concepts", "Jowen Gormere, jowen gormere"], "--concepts"),
    (["compare", "--modes", ""], "--modes"),
    (["audit", "--patch", "p", "--probes", "prompts,prompts"], "--probes"),
])
def test_meaningless_values_are_refused_at_parse_time(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def _options(parser, prefix="slug"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _options(sp, f"{prefix} {name}")
        elif a.option_strings and a.dest != "help":
            yield prefix, a


def test_every_option_has_help():
    missing = [f"{cmd} {a.option_strings[0]}" for cmd, a in _options(build_parser()) if not a.help]
    assert missing == []


def test_top_level_help_lists_every_exit_status(capsys):
    """`slug --help` names each status the CLI can end with (main returns 141 and 143 itself; a refusal is 2)."""
    import re

    from slugkit import cli

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    returned = set(re.findall(r"return (1[34]\d)\b", open(cli.__file__).read()))
    assert returned >= {"141", "143"}
    for code in ["0 pass", "2 a usage or input error, or a refusal", "3 ", "4 ", "130 interrupted", *returned]:
        assert code in text, code


def test_help_version_and_usage_errors_do_not_import_torch():
    """`slug --help`, `--version` and a refused option answer in ~0.1 s: building the parser imports no torch (it
    took 1.7 s of a 2–3 s wait for a one-line usage error)."""
    import subprocess
    import sys

    code = ("import sys; import slugkit; from slugkit.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from slugkit import apply_patch; assert 'torch' in sys.modules")  # the public API still works
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    for argv in (["--version"], ["demo", "--threshold", "2"]):
        code = (f"import sys; from slugkit.cli import main\ntry: main({argv!r})\nexcept SystemExit: pass\n"
                "assert 'torch' not in sys.modules, 'torch imported'")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_a_refusal_reads_as_indented_clauses():
    """A refusal is one sentence of up to ~900 characters; the terminal gets its clauses on indented lines, split
    only outside parentheses (the exception's text, stored in result/benchmark JSON, is unchanged)."""
    from slugkit.cli import refusal_text

    msg = ("no candidate layer (searched 4 of 12) has a step at which the generator forgets 'x' (≤ 5%; of 20) while "
           "the others lose ≤ 5% (no second layer: no searched step lowered it, nor 3 halvings (the smallest: L1 step "
           "2: concept 0.85)); closest: L2 step 9: concept 0.10; try --other-budget (the CLIP step)")
    assert refusal_text(msg).split("\n") == [
        "no candidate layer (searched 4 of 12) has a step at which the generator forgets 'x' (≤ 5%; of 20) while the "
        "others lose ≤ 5%",
        "  no second layer: no searched step lowered it, nor 3 halvings (the smallest: L1 step 2: concept 0.85)",
        "  closest: L2 step 9: concept 0.10",
        "  try --other-budget (the CLIP step)"]
    # each round on its lines (it was one line of ~1500 characters: trial 26)
    rounds = ("2 rounds of layer edits did not forget within the budgets (round 1: a (x; y); closest: c; try d; "
              "round 2: b; closest: e) (no patch)")
    assert refusal_text(rounds).split("\n") == [
        "2 rounds of layer edits did not forget within the budgets (no patch)", "  round 1: a (x; y)",
        "      closest: c", "      try d", "  round 2: b", "      closest: e"]


def test_version(capsys):
    import slugkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and slugkit.__version__ in capsys.readouterr().out


def test_curate_retain_is_renamed_with_a_deprecated_alias(capsys):
    a = build_parser().parse_args(["curate", "--shards", "s", "--concept", "A", "--out", "o", "--retain", "5"])
    assert a.max_retain == 5 and "deprecated" in capsys.readouterr().err
    a = build_parser().parse_args(["curate", "--shards", "s", "--concept", "A", "--out", "o", "--max-retain", "0"])
    assert a.max_retain == 0


def test_unlearn_needs_evaluation_folders_for_real_models(capsys):
    rc = main(["unlearn", "--model", "ViT-B-32", "--concept", "A", "--out", "x", "--forget", "f", "--retain", "r"])
    assert rc == 2 and "--val-identities and --test-identities" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "tpu9"])
def test_devices_that_cannot_run_are_refused(device, capsys, tmp_path):
    assert main(["demo", "--device", device, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}") and err.count("\n") == 1
    assert "cpu, cuda" in err and "opengl" not in err  # torch's list of twenty device types is not ours to print
    assert not (tmp_path / "x").exists()


def test_out_that_is_the_current_folder_is_refused(tmp_path, monkeypatch, capsys):
    """`--out .` would have the run renamed over the folder the user stands in."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "."]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    for cmd in (["canvas", "lite"], ["demo"], ["compare"], ["demo", "--target", "vlm"]):  # '' is not the default
        assert main([*cmd, "--out", " "]) == 2
        assert "--out is empty" in capsys.readouterr().err
    for flag in ("--forget", "--retain", "--gradients"):  # an unset shell variable said "pass --forget and --retain"
        args = {"--forget": "f.tar", "--retain": "r.tar", flag: ""}
        assert main(["unlearn", "--model", "ViT-B-32", "--concept", "X", "--out", "o", *sum(args.items(), ())]) == 2
        assert f"error: {flag} is empty (an unset shell variable?)" in capsys.readouterr().err
    for args in (["apply", "--patch", "p", "--checkpoint", "", "--out", "x.safetensors"],  # "needs --model M"
                 ["export", "--lora", "p", "--pipeline", " ", "--out", "l.safetensors"],  # ".: not a pipeline"
                 ["curate", "--shards", "", "--concept", "x", "--out", "c"], ["audit", "--patch", "p", "--concept", ""],
                 ["world", "data", "--out", ""], ["apply", "--patch", "", "--model", "embedded", "--out", "x.st"]):
        assert main(args) == 2
        flag = next(args[i] for i in range(len(args) - 1) if not args[i + 1].strip())
        err = capsys.readouterr().err
        assert err.startswith("error: --out is empty") if flag == "--out" else \
            err.startswith(f"error: {flag} is empty (an unset shell variable?); give a value"), err
    assert main(["curate", "--shards", "", "--concept", "x", "--out", "c"]) == 2  # optional: may be left out
    assert capsys.readouterr().err.endswith("give a value, or leave the option out\n")
    assert main(["export", "--lora", "", "--pipeline", "embedded", "--out", "l.safetensors"]) == 2  # required
    assert capsys.readouterr().err == "error: --lora is empty (an unset shell variable?); give a value\n"
    assert main(["inspect", ""]) == 2
    assert "the patch argument is empty" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for out in ("afile/sub", "afile/sub/deeper"):  # a file in the way: the message names --out and the culprit
        assert main(["canvas", "lite", "--methods", "uce", "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"afile: is a file, not a folder, so {out} cannot be created under it" in err, err
        assert "afile" in err.split(":", 1)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_worst_budget_off_is_the_papers_choice():
    from slugkit.cli import build_parser
    from slugkit.cli.args import budgets_of, search_config

    a = build_parser().parse_args(["demo", "--worst-budget", "off"])
    assert search_config(a).worst_budget is None and budgets_of(a).worst_drop == 1.0
    a = build_parser().parse_args(["demo"])
    assert search_config(a).worst_budget == 0.2 and budgets_of(a).worst_drop == 0.2


def test_null_space_layers_all_needs_the_null_space_step(tmp_path, capsys):
    assert main(["demo", "--target", "sd", "--null-space-layers", "all", "--out", str(tmp_path / "x")]) == 2
    assert "--sd-step null-space" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, said", [
    (["demo", "--concept", "Serna Malton", "--concepts", "Jowen Gormere,Meylan Falmond"], "exclude each other"),
    (["unlearn", "--concept", "Serna Malton", "--concepts", "Jowen Gormere,Meylan Falmond"], "exclude each other"),
    (["compare", "--concept", "Serna Malton", "--concepts", "Jowen Gormere,Meylan Falmond"], "exclude each other"),
    (["demo", "--sequential"], "--sequential unlearns the --concepts one after another"),
    (["demo", "--data-dir", "{tmp}/x"], "overlap"),  # the run curated over the world's files, then refused
    (["demo", "--data-dir", "{tmp}/x/world"], "overlap"),
    (["compare", "--data-dir", "{tmp}"], "overlap"),
])
def test_conflicting_demo_options_are_refused(argv, said, capsys, tmp_path):
    """`--concept` beside `--concepts` was ignored (the others were unlearned), `--sequential` alone was ignored
    (new-user trial): both are refused before any work."""
    assert main([*(x.format(tmp=tmp_path) for x in argv), "--out", str(tmp_path / "x")]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_more_threads_than_cores_is_warned_about(capsys, tmp_path):
    """`--threads 999` on 2 cores was accepted silently and the demo crawled (third new-user trial)."""
    import os

    many = (os.cpu_count() or 1) + 1
    assert main(["demo", "--threads", str(many), "--sequential", "--out", str(tmp_path / "x")]) == 2  # stops early
    err = capsys.readouterr().err
    assert f"warning: --threads {many} is more than the {os.cpu_count() or 1} CPU cores here" in err


def test_an_error_naming_an_odd_path_stays_one_line(tmp_path, capsys):
    """A newline or an escape sequence in a path split the one-line `error: …` or recoloured the terminal (fourth
    trial): they are escaped, as `slug inspect` escapes a patch's fields; other letters are shown as they are."""
    for args in (["inspect", str(tmp_path / "bad\nname")], ["audit", "--patch", str(tmp_path / "p\x1b[31mq")],
                 ["apply", "--patch", str(tmp_path / "nö\npatch"), "--model", "embedded", "--out", "o"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err, err
        assert "\\n" in err or "\\x1b" in err
    assert main(["inspect", str(tmp_path / "bä d")]) == 2
    assert "bä d" in capsys.readouterr().err


def test_a_symlink_loop_is_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    """`ln -s loopB loopA; ln -s loopA loopB; slug demo --out loopA` was a RuntimeError traceback (fifth trial)."""
    monkeypatch.chdir(tmp_path)
    os.symlink("loopB", "loopA")
    os.symlink("loopA", "loopB")
    for args in (["demo", "--out", "loopA"], ["world", "data", "--out", "loopA"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == f"error: {tmp_path / 'loopA'}: is a loop of symbolic links; name a real folder or file\n", err
    os.symlink("nowhere", "dangling")
    for patch, said in (("loopA", "it is a loop of symbolic links"),
                        ("dangling", "it is a symbolic link to nowhere, which does not exist")):
        for args in (["inspect", patch], ["audit", "--patch", patch, "--out", "o"]):  # said "no patch at" only
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: no patch at {patch}: {said}; a patch is a folder"), err
    assert main(["inspect", "dangling/patch"]) == 2  # a folder above the patch leads nowhere (ninth trial)
    assert ("no patch at dangling/patch: dangling is a symbolic link to nowhere, which does not exist"
            in capsys.readouterr().err)


def test_a_closed_stdout_at_start_is_no_traceback():
    """`slug world names >&-` ended with an AttributeError on sys.stdout None (fifth trial)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "slugkit", "world", "names"], preexec_fn=lambda: os.close(1),
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_the_joint_and_the_sequential_run_of_the_same_concepts_default_to_different_folders(tmp_path, monkeypatch,
                                                                                            capsys):
    """The README's joint then sequential commands collided: both defaulted to runs/demo-A+B (eighth trial)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("demo-Jowen_Gormere+Serna_Malton", "demo-Jowen_Gormere+Serna_Malton-sequential"):
        (tmp_path / "runs" / folder).mkdir(parents=True)
        (tmp_path / "runs" / folder / "result.json").write_text("{}")
    for extra, folder in (([], "demo-Jowen_Gormere+Serna_Malton"),
                          (["--sequential"], "demo-Jowen_Gormere+Serna_Malton-sequential")):
        assert main(["demo", "--concepts", "Jowen Gormere,Serna Malton", *extra]) == 2
        assert f"runs/{folder} already holds a run" in capsys.readouterr().err


def test_a_misspelled_name_gets_a_suggestion(capsys):
    """`--concept "Jowen Gormer"` said "unknown identity" with no hint (eighth trial); a T2I concept likewise."""
    assert main(["demo", "--concept", "Jowen Gormer"]) == 2
    assert "unknown identity 'Jowen Gormer'; did you mean 'Jowen Gormere'?" in capsys.readouterr().err
    assert main(["demo", "--target", "sd", "--concept", "red triangel"]) == 2
    assert "did you mean 'red triangle'?" in capsys.readouterr().err
    # trial 38: a concept of the other demo got no word of where it belongs
    assert main(["demo", "--concept", "Red Triangle"]) == 2
    assert ("'red triangle' is an object of the embedded text-to-image model: `slug demo --target sd --concept 'red "
            "triangle'` unlearns it") in capsys.readouterr().err
    assert main(["demo", "--target", "sd", "--concept", "jowen gormere"]) == 2
    assert "'Jowen Gormere' is an identity: the CLIP demo (no --target) and --target vlm" in capsys.readouterr().err


def test_the_audit_lines_name_the_graded_number_and_a_failed_patch(tmp_path, capsys):
    """The relearning line printed step counts while the grade came from a speed-up shown only in audit.md, and the
    audit of a failed run's patch read as a plain pass (ninth trial)."""
    import torch

    from slugkit.cli.audit import _print_audit
    from slugkit.patch import make_patch, save_patch

    base = {"w": torch.ones(3)}
    save_patch(make_patch(base, {"w": base["w"] * 2}, base_model="toy", adapter="t", concept="A",
                          extra={"verdict": "fail", "verdict_codes": ["model_broken"]}), tmp_path / "patch")
    rec = {"probe": "relearn", "status": "pass", "gating": True, "rows": [],
           "summary": "n=5: concept back to 0.5 after 8 steps",
           "graded": {"name": "speed-up of relearning over learning the controls", "value": 0.888, "pass_at": 1.5,
                      "fail_at": 3.0}}
    from slugkit.audit.run import write_audit

    result = {"concept": "A", "seconds": 1.0, "status": "pass", "probes": [rec], "patch": str(tmp_path / "patch")}
    write_audit(result, tmp_path / "audit")  # as every audit does before the CLI prints it
    assert _print_audit(result, tmp_path / "audit") == 0
    out = capsys.readouterr().out
    assert ("after 8 steps; graded on the speed-up of relearning over learning the controls: 0.89 (pass ≤ 1.5, "
            "fail > 3)") in out
    assert "note: the run that made this patch had verdict fail (the edit broke the model: utility" in out
    assert "not the damage the edit did to the rest of the model" in out  # "not whether it happened": it did
    # and the saved audit says it too (the terminal did, audit.md / audit.json opened with a plain pass: tenth trial)
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["patch_run_verdict"] == "fail"
    assert "**Note: the run that made this patch had verdict fail** (the edit broke the model" in \
        (tmp_path / "audit" / "audit.md").read_text()


@pytest.mark.parametrize("flag", ["--utility-classnames", "--names", "--related-names", "--utility-templates"])
def test_a_folder_or_a_missing_file_for_a_text_file_option_names_the_option(flag, tmp_path, capsys):
    """`--utility-classnames W/val/utility` said "W/val/utility: Is a directory", naming no option (ninth trial)."""
    for cmd, value, said in (("unlearn", tmp_path, f"{tmp_path} is a folder; give a text file"),
                             ("compare", tmp_path, f"{tmp_path} is a folder; give a text file"),
                             ("unlearn", tmp_path / "nope.txt", f"{tmp_path / 'nope.txt'}: no such file")):
        with pytest.raises(SystemExit) as e:
            main([cmd, flag, str(value), "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and f"argument {flag}: {said}" in capsys.readouterr().err


def test_unlearn_on_the_embedded_model_defaults_to_one_thread(tmp_path, monkeypatch):
    """`slug unlearn --model embedded` ran on torch's 2 threads: beside another job 130 s against 13.6 s with
    --threads 1, the same patch bytes (ninth trial); `slug demo` and `slug audit` already default to 1."""
    import slugkit.workflows.world_runs as world_runs

    seen = []

    def stop(*args, **kw):
        seen.append(kw["threads"])
        raise ValueError("stopped by the test")  # before any work: printed as an error, exit 2

    monkeypatch.setattr(world_runs, "world_config", stop)
    for extra in ([], ["--threads", "2"]):
        assert main(["unlearn", "--model", "embedded", "--concept", "Jowen Gormere", "--out", str(tmp_path / "o"),
                     *extra]) != 0
    assert seen == [1, 2]


def test_audit_takes_the_patchs_base_checkpoint(tmp_path, monkeypatch, capsys):
    """A patch made with `--pretrained ck.safetensors` was audited on the shipped weights, and failed there
    (fourteenth trial): the audit now loads the patch's base checkpoint unless --pretrained says otherwise."""
    import torch

    import slugkit.audit as audit
    from slugkit.patch import make_patch, save_patch

    base = {"w": torch.ones(3)}
    save_patch(make_patch(base, {"w": base["w"] * 2}, base_model={"model": "embedded", "pretrained": "ck.safetensors"},
                          adapter="open_clip", concept="A"), tmp_path / "patch")
    seen = {}

    def fake(patch, model, concept, pretrained=None, **kw):
        seen.update(model=model, pretrained=pretrained)
        raise SystemExit(0)

    monkeypatch.setattr(audit, "audit_patch", fake)
    with pytest.raises(SystemExit):
        main(["audit", "--patch", str(tmp_path / "patch"), "--out", str(tmp_path / "a")])
    assert seen == {"model": "embedded", "pretrained": "ck.safetensors"}
    assert "note: auditing on the patch's base checkpoint ck.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--patch", str(tmp_path / "patch"), "--pretrained", "other.safetensors", "--out",
              str(tmp_path / "b")])
    assert seen["pretrained"] == "other.safetensors"


def test_apply_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    """`slug apply --checkpoint F` dropped --full-pipeline, --text-encoder and --pretrained without a word (while
    --clip-skip was refused; fifteenth trial)."""
    ck = ["--patch", "p", "--checkpoint", "c.safetensors", "--out", str(tmp_path / "o.safetensors")]
    for cmd in ("apply", "revert"):
        for extra, said in ((["--pretrained", "w.safetensors"], "--pretrained goes with --model"),
                            (["--family", "hf_clip"], "--family goes with --model"),
                            (["--full-pipeline"], "--full-pipeline applies to --pipeline only"),
                            (["--text-encoder", "text_encoder_2"], "--text-encoder applies to --pipeline only")):
            assert main([cmd, *ck, *extra]) == 2, (cmd, extra)
            assert said in capsys.readouterr().err, (cmd, extra)
    assert main(["apply", "--patch", "p", "--llava", "l", "--out", str(tmp_path / "x"), "--full-pipeline"]) == 2
    assert "--full-pipeline applies to --pipeline only" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_command_names_the_commands(capsys):
    """`slug` or `slug world` alone said `the following arguments are required: cmd` / `world_cmd`."""
    for argv, prog, first in (([], "slug", "demo"), (["world"], "slug world", "names"),
                              (["canvas"], "slug canvas", "lite")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {prog} needs a command: {first}, " in err and f"`{prog} --help` says what each does" in err
    # trial 39: a command's option before the command was told "slug needs a command"
    for argv, said in ((["--threads", "1", "grads", "--out", "g.safetensors"], "error: --threads is an option of the "
                        "command, not of slug: put it after the command (slug grads --threads …)"),
                       (["world", "--out", "x", "data"], "error: --out is an option of the command, not of slug "
                                                         "world: put it after the command (slug world data --out …)")):
        assert main(argv) == 2
        assert said in capsys.readouterr().err


def test_small_misleading_refusals(tmp_path, capsys):
    """Sixteenth trial: `--vlm-model` with the CLIP demo said "run --target sd"; `apply --full-pipeline --out` inside
    the source pipeline was taken (later copies carried it along); `eval-sd --concepts <folder>` said ">= 2 names"."""
    assert main(["demo", "--vlm-model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.rstrip().endswith("drop them or run --target vlm")
    pipe = tmp_path / "pipe base"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    (tmp_path / "p").mkdir()
    for cmd in ("apply", "revert"):
        assert main([cmd, "--pipeline", str(pipe), "--patch", str(tmp_path / "p"), "--out", str(pipe / "patched"),
                     "--full-pipeline"]) == 2
        assert f"is inside {pipe}, the model it is written from" in capsys.readouterr().err
    assert main(["eval-sd", "--pipeline", "embedded", "--patch", "p", "--target", "x", "--concepts", str(tmp_path),
                 "--out", str(tmp_path / "ev")]) == 2
    assert f"{tmp_path} is a folder; give a text file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "pipe base"]


def test_an_unknown_option_names_the_commands_help_and_the_nearest_option(capsys):
    """Twentieth trial: `slug demo --n-targt 3` said `(see `slug --help`)`, the top-level help, which lists commands,
    not the option the user misspelt."""
    for argv, said in ((["demo", "--n-targt", "3"], "error: unrecognized arguments: --n-targt 3 (did you mean "
                                                    "--n-target?) (see `slug demo --help`)"),
                       (["world", "names", "--zzzzzz"], "error: unrecognized arguments: --zzzzzz (see `slug world "
                                                        "names --help`)"),
                       # the trainers' own parsers printed argparse's usage block (twenty-first trial)
                       (["world", "train-t2i", "--chanels", "8", "--out", "x"],
                        "error: unrecognized arguments: --chanels 8 (did you mean --channels?) (see `slug world "
                        "train-t2i --help`)"),
                       (["world", "train-canvas", "--steps", "abc", "--out", "x"],
                        "error: argument --steps: invalid int value: 'abc' (see `slug world train-canvas --help`)"),
                       # no option near: "did you mean --help?" (twenty-second trial)
                       (["world", "train-canvas", "--chanels", "8", "--out", "x"],
                        "error: unrecognized arguments: --chanels 8 (see `slug world train-canvas --help`)"),
                       # a typo that leaves a required option out: argparse named only the missing ones
                       (["apply", "--patchh", "x"], "error: unrecognized arguments: --patchh (did you mean --patch?) "
                                                    "(see `slug apply --help`)"),
                       (["world", "train-t2i", "--chanels", "8"],
                        "error: unrecognized arguments: --chanels (did you mean --channels?) (see `slug world "
                        "train-t2i --help`)"),
                       (["export"], "error: the following arguments are required: --lora, --pipeline, --out (see "
                                    "`slug export --help`)")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip() == said


def test_a_required_option_shows_no_default_in_help(capsys):
    """Twentieth trial: `slug world train-t2i --help` said "--out OUT … (default: None)" of a required option."""
    for cmd in ("train-t2i", "train-canvas"):
        with pytest.raises(SystemExit):
            main(["world", cmd, "--help"])
        text = capsys.readouterr().out
        out_help = text[text.index("  --out OUT"):text.index("  --overwrite")]
        assert "(default: None)" not in out_help and "(default: False)" in text, cmd


def test_curate_names_only_the_option_missing(capsys, tmp_path):
    """Twenty-second trial: `slug curate --shards X --out O` said "curate needs --shards and --concept"."""
    assert main(["curate", "--shards", str(tmp_path / "x.tar"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: curate needs --concept (or --generate")


def test_curate_generate_refuses_an_out_inside_the_pipeline(capsys, tmp_path):
    """Trial 43: `slug curate --generate … --pipeline P --out P/gen` wrote into the pipeline folder, and a later
    `slug apply --full-pipeline` copied it along; refused before the pipeline is loaded."""
    (tmp_path / "sd").mkdir()
    assert main(["curate", "--generate", "a photo of a sea turtle", "-n", "2", "--pipeline", str(tmp_path / "sd"),
                 "--concept", "sea turtle", "--out", str(tmp_path / "sd" / "gen")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'sd' / 'gen'} is inside --pipeline {tmp_path / 'sd'}" in err
    assert not (tmp_path / "sd" / "gen").exists()


def test_the_steps_of_a_sequential_run_applied_in_order_carry_the_runs_verdict(tmp_path):
    """Trial 46: the steps applied in order are the chained patch's model, yet printed their own "pass" where the
    chained patch warned "verdict was fail" (the final model failed); the run's verdict is said beside them."""
    import torch

    from slugkit.patch import make_patch, save_patch
    from slugkit.patch.summary import sequential_run_line

    seq = tmp_path / "seq"
    base = {"w": torch.ones(3)}
    for k, name in ((1, "A"), (2, "B")):
        save_patch(make_patch(base, {"w": base["w"] * (k + 1)}, base_model="toy", adapter="t", concept=name,
                              extra={"verdict": "pass"}), seq / f"{k}-{name}" / "patch")
    save_patch(make_patch(base, {"w": base["w"] * 3}, base_model="toy", adapter="t", concept=["A", "B"],
                          extra={"verdict": "fail", "verdict_codes": ["not_forgotten"]}), seq / "patch")
    steps = [str(seq / "1-A" / "patch"), str(seq / "2-B" / "patch")]
    assert sequential_run_line(steps) is None  # no result.json: not a sequential run's folder
    (seq / "result.json").write_text(json.dumps({"mode": "sequential"}))
    line = sequential_run_line(steps)
    assert line.startswith(f"warning: the sequential run {seq} has verdict fail on the model all its steps make")
    assert "of them" in sequential_run_line(steps[:1] + steps[:1]) and sequential_run_line(steps[:1]) is None


def test_every_seed_option_refuses_a_negative_seed_at_parse_time(capsys):
    """`slug canvas lite --seed -5` ran its first method, then failed in numpy naming no option (trial 51): every
    command's --seed is a seed in [0, 2^63 - 1], refused when parsed (world train-t2i and train-canvas too:
    verification 52)."""
    commands = [cmd.split()[1:] for cmd, a in _options(build_parser()) if "--seed" in a.option_strings]
    assert len(commands) >= 8  # unlearn, demo, compare, curate, eval-sd, canvas lite/run, world train/train-vlm
    for argv in commands:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--seed", "-5"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--seed" in err and "must be in [0, 2^63 - 1], got -5" in err, (argv, err)
    for trainer in ("train-t2i", "train-canvas"):  # their own parsers, checked before any training
        for bad in ("-5", str(2 ** 64)):
            with pytest.raises(SystemExit) as e:
                main(["world", trainer, "--seed", bad, "--out", "/nonexistent/never-written"])
            assert e.value.code == 2
            assert f"argument --seed: must be in [0, 2^63 - 1], got {bad}" in capsys.readouterr().err


def test_a_warn_patch_is_noted_once_it_is_applied_not_above_a_refusal(tmp_path, capsys):
    """Verification 65: `slug apply` printed "note: P comes from a run whose verdict was warn" and then refused the
    --out (two messages for one mistake, the first about something else). The note now comes once the model is
    written, beside what was applied; a refusal is said alone."""
    import torch

    from slugkit.patch import make_patch, save_patch, save_state_dict_file
    from slugkit.workflows.verdict import verdict_fields

    fields = verdict_fields({"status": "warn", "reasons": [{"severity": "warn", "code": "worst_drop"}]})
    base = {"a": torch.ones(2)}
    save_patch(make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="open_clip", concept="A",
                          step_size=1.0, extra=fields), tmp_path / "patch")
    save_state_dict_file(base, tmp_path / "m.safetensors")
    save_state_dict_file({"a": torch.zeros(2)}, tmp_path / "wrong.safetensors")
    apply = ["apply", "--patch", str(tmp_path / "patch"), "--out", str(tmp_path / "o.safetensors"), "--checkpoint"]
    assert main(apply + [str(tmp_path / "wrong.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot apply patch" in err and "verdict was warn" not in err
    assert not (tmp_path / "o.safetensors").exists()
    assert main(apply + [str(tmp_path / "m.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "comes from a run whose verdict was warn (worst_drop)" in captured.err
    assert "applied 1 patch(es); wrote" in captured.out
    assert main(["apply", "--patch", str(tmp_path / "patch"), "--pipeline", "embedded", "--out", str(tmp_path)]) == 2
    assert "verdict was warn" not in capsys.readouterr().err  # --out refused after the patch loaded: alone too
    # verification 66: --out onto the patch's own file said "pass --overwrite", which then said "inside the patch"
    inside = str(tmp_path / "patch" / "patch.safetensors")
    for cmd in (apply[:4] + [inside, "--checkpoint", str(tmp_path / "m.safetensors")],
                ["export", "--lora", str(tmp_path / "patch"), "--pipeline", "embedded", "--out", inside]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "inside the patch" in err and "--overwrite" not in err, cmd
    assert main(apply + [str(tmp_path / "m.safetensors")]) == 2  # o.safetensors exists now: that advice stands
    assert "o.safetensors already exists; pass --overwrite" in capsys.readouterr().err
    # a refusal writes nothing beside --out first (the writer's sentinel went into the patch folder: verification 67)
    listed, mtime = sorted(os.listdir(tmp_path / "patch")), os.stat(tmp_path / "patch").st_mtime_ns
    for out in (tmp_path / "patch" / "pipe", tmp_path / "patch" / "new" / "sub"):
        assert main(["apply", "--patch", str(tmp_path / "patch"), "--pipeline", "embedded", "--out", str(out)]) == 2
        assert "inside the patch" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "patch")) == listed and os.stat(tmp_path / "patch").st_mtime_ns == mtime
    # --out under a file said "FILE: File exists" (the writer's mkdir; verification 67's leftovers): the file is named
    (tmp_path / "FILE").write_text("x")
    for cmd in (apply[:4] + [str(tmp_path / "FILE" / "x.safetensors"), "--checkpoint", str(tmp_path / "m.safetensors")],
                ["apply", "--patch", str(tmp_path / "patch"), "--pipeline", "embedded", "--out",
                 str(tmp_path / "FILE" / "x" / "y")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'FILE'} is a file, not a folder" in err and "choose another --out" in err, cmd
    # two runs' patches composed: their combination was never measured, which was not said (verification 66)
    base2 = {"a": torch.ones(2), "b": torch.ones(3)}
    save_state_dict_file(base2, tmp_path / "m2.safetensors")
    for name in "ab":
        save_patch(make_patch({name: base2[name]}, {name: base2[name] * 2}, base_model="toy", adapter="open_clip",
                              concept="A", step_size=1.0), tmp_path / f"p{name}")
    assert main(["apply", "--patch", str(tmp_path / "pa"), "--patch", str(tmp_path / "pb"), "--checkpoint",
                 str(tmp_path / "m2.safetensors"), "--out", str(tmp_path / "o2.safetensors")]) == 0
    assert "note: 2 patches composed; each was measured on its own, their combination was not" in \
        capsys.readouterr().err
