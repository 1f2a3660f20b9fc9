"""``slug eval-sd``: a text-to-image pipeline scored before and after a text-encoder patch on generated images (UA,
IRA, CRA, CLIP score, the nearest concepts), and ``--pipeline`` loading shared with ``apply``, ``export`` and
``curate --generate``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..common.files import write_json
from ..common.text import printable
from .args import COUNT, SEED, THREADS, float_at_least, int_at_least, refuse, split_list, template
from .outputs import out_inside_model, out_inside_run

GEN_EVAL = "gen_eval.json"
LOW_BASE = 0.5  # the unpatched pipeline draws the target on less than this share: the "after" says little


def load_pipeline(spec: str, device: str = "cpu"):
    """``--pipeline``: ``embedded`` (the embedded text-to-image model) or a local diffusers pipeline folder, whose
    per-call denoising bars are off (slug's own bar counts the images; `--no-progress` printed them: trial 43)."""
    if spec == "embedded":
        from ..world.t2i import EmbeddedT2IPipeline

        return EmbeddedT2IPipeline.load()
    from ..integrations.diffusers_sd import load_pipeline_folder

    pipe = load_pipeline_folder(spec, device=device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def concept_names(spec: str | None, option: str) -> list[str]:
    """A concept list: a file (one name per line; blank lines and lines starting with ``#`` skipped) or ``A,B,C``.
    ``ValueError`` names ``option`` for a path that does not exist (it was read as one concept named like the
    path: "needs >= 2 names") and for a name given twice (case-insensitive: the judge counted it as two classes)."""
    from ..data.folders import read_lines

    if not spec:
        return []
    if Path(spec).is_file() or Path(spec).is_dir():  # a folder: read_lines says so (it read as one name)
        names = read_lines(spec)
    elif "," not in spec and (os.sep in spec or spec.endswith((".txt", ".csv"))):
        raise ValueError(f"{option} {spec}: no such file; give a file of names (one per line) or a comma list A,B,C")
    else:
        names = split_list(spec)
    seen = set()
    for n in names:
        if n.casefold() in seen:
            raise ValueError(f"{option}: {n!r} is given twice; give each concept once")
        seen.add(n.casefold())
    return names


def _check_out(a) -> str | None:
    out = Path(a.out)
    msg = out_inside_run(a.out)  # its files would mix with that run's (slug demo, apply and audit refuse it too)
    if msg:
        return msg
    if os.path.lexists(out) and not out.is_dir():
        return f"--out {a.out} exists and is not a folder; give a folder for {GEN_EVAL} and generations.png"
    inside = out_inside_model(a.out, {})  # it wrote into the shipped pipeline's folder
    if inside:
        return inside
    if any((d / "model_index.json").is_file() for d in (out, *out.parents) if d.is_dir()):
        return f"--out {a.out} is in a diffusers pipeline folder; write the evaluation elsewhere"
    if (out / GEN_EVAL).exists() and not a.overwrite:  # a 4-minute evaluation was replaced without a word
        return f"{a.out} already holds {GEN_EVAL}; pass --overwrite to replace it, or choose another --out"
    return None


def _patch_concepts(patch) -> list[str]:
    c = patch.meta.get("concept")
    return [str(x) for x in (c if isinstance(c, list) else [c] if c else [])]


def _judge_options(msg: str) -> str:
    """A model-loading message with the judge's options named as eval-sd spells them (the loaders say ``--model``,
    ``--pretrained``, ``--family``: the options of the commands that load the model being unlearned)."""
    import re

    return re.sub(r"--(model|pretrained|family)\b", r"--judge-\1", msg)


def cmd_eval_sd(a) -> int:
    """`slug eval-sd`: UA / IRA / CRA / CLIP score of a pipeline before and after a text-encoder patch."""
    import torch

    from ..eval.generated import GenerationPlan, ZeroShotJudge, before_after
    from ..models import ModelLoadError, load_adapter
    from ..patch import compose_patches, load_patch
    from ..patch.summary import failed_because

    concepts = concept_names(a.concepts, "--concepts")
    if len(concepts) < 2:
        return refuse("--concepts needs the concept list the judge chooses from (a file or A,B,C; >= 2 names)")
    cross = concept_names(a.cross_concepts, "--cross-concepts")
    if a.target.casefold() in {c.casefold() for c in cross}:  # taken without a word (trial 39)
        return refuse(f"--cross-concepts holds the --target {a.target!r}: CRA measures the other domain's concepts, "
                      "which the erasure should keep; remove it from the list")
    msg = _check_out(a)
    if msg:
        return refuse(msg)
    spelled = {c.casefold(): c for c in concepts}
    target = spelled.get(a.target.casefold(), a.target)  # "Red Triangle" ended in KeyError (sixteenth trial)
    if target.casefold() not in spelled:  # the judge never had it as a class: UA 1.000 before and after
        import difflib

        near = difflib.get_close_matches(target.casefold(), list(spelled), 1, 0.8)
        if near:  # "red triangl" became a class of its own and the real target collateral (twentieth trial)
            return refuse(f"--target {target!r} is not in --concepts, which has {spelled[near[0]]!r}: did you mean "
                          "it? (a target outside --concepts is added as a class of its own)")
        concepts = [target, *concepts]
        print(f"note: --target {target!r} is not in --concepts; the judge classifies over it too "
              f"({len(concepts)} classes)", file=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    patches = [load_patch(p) for p in a.patch]
    warnings = [f"{path} comes from a run whose verdict was fail ({failed_because(p.meta['extra'])}); see its "
                "result.json" for path, p in zip(a.patch, patches)
                if (p.meta.get("extra") or {}).get("verdict") == "fail"]
    named = [c for p in patches for c in _patch_concepts(p)]
    if named and target.casefold() not in {c.casefold() for c in named}:
        warnings.append(f"--target {target!r} is not the concept of the patch ({', '.join(map(repr, named))}); UA "
                        "measures the target you name")
    for w in warnings:  # as `slug apply` and `export` warn; also recorded in gen_eval.json
        print(f"warning: {w}", file=sys.stderr)
    pipe = load_pipeline(a.pipeline, device=a.device)
    try:
        judge_ad = load_adapter(a.judge_model, a.judge_pretrained, family=a.judge_family, device=a.device)
    except (ModelLoadError, ValueError) as e:  # said "--model …; pass --pretrained TAG" (twentieth trial)
        raise type(e)(_judge_options(str(e))) from None
    judge = ZeroShotJudge(judge_ad, concepts, a.judge_template or [a.template])
    cross_judge = ZeroShotJudge(judge_ad, cross, [a.cross_template or a.template]) if cross else None
    plan = GenerationPlan.build(target, concepts, a.template, a.n_target, a.n_other, cross,
                                a.cross_template, seed=a.seed)
    patch = compose_patches(patches)
    meta = {"pipeline": a.pipeline, "template": a.template, "seed": a.seed, "n_target": a.n_target,
            "n_other": a.n_other, "patches": [{"path": str(path), "fingerprint": p.fingerprint,
                                               "concept": p.meta.get("concept")} for path, p in zip(a.patch, patches)],
            "warnings": warnings}
    r = before_after(pipe, patch, judge, plan, a.out, cross_judge=cross_judge, steps=a.steps, guidance=a.guidance,
                     progress=not a.no_progress, n_neighbour=a.n_neighbour, meta=meta)
    print("| generated images | before | after |\n|---|---|---|")
    for k in ("generated_target_recognised", "UA", "IRA", "CRA", "clip_score"):
        b, af = r["before"].get(k), r["after"].get(k)
        if b is not None:
            print(f"| {k} | {b:.3f} | {af:.3f} |")
    base = r["before"].get("generated_target_recognised")
    if base is not None and base < LOW_BASE:  # "UA 1.000" read as perfect forgetting of a concept never drawn
        w = (f"the unpatched pipeline drew {target!r} recognisably on only {base:.0%} of its images; UA and the "
             "after column say little about forgetting it (check --target, --template and --concepts)")
        print(f"warning: {w}", file=sys.stderr)
        write_json(Path(a.out) / GEN_EVAL, {**r, "warnings": [*warnings, w]})  # the JSON read alone said UA 1.000
    print(f"outputs: {printable(a.out)}/{GEN_EVAL}, {printable(a.out)}/generations.png")
    return 0


def add_eval_sd_parser(sub) -> None:
    """The ``eval-sd`` subcommand."""
    ev = sub.add_parser("eval-sd", help="score a text-to-image pipeline before/after a patch on generated images "
                                        "(UA, IRA, CRA, CLIP score)")
    ev.add_argument("--pipeline", required=True, help="diffusers pipeline folder, or 'embedded'")
    ev.add_argument("--patch", action="append", required=True, help="patch folder (repeatable to compose)")
    ev.add_argument("--target", required=True, help="the forgotten concept (must be in --concepts or is added)")
    ev.add_argument("--concepts", required=True, help="in-domain concept list the judge classifies over: a file "
                                                      "(one per line; '#' lines skipped) or A,B,C")
    ev.add_argument("--template", type=template, default="a photo of {}.",
                    help="generation prompt template ({} = concept; default 'a photo of {}.')")
    ev.add_argument("--judge-template", type=template, action="append", default=None,
                    help="zero-shot template(s) of the judge (default: --template)")
    ev.add_argument("--cross-concepts", default=None, help="cross-domain concept list for CRA (file or A,B,C)")
    ev.add_argument("--cross-template", type=template, default=None,
                    help="prompt template of the cross-domain concepts (default: --template)")
    ev.add_argument("--n-target", type=COUNT, default=10, help="generated images of the target (default 10)")
    ev.add_argument("--n-other", type=COUNT, default=2, help="generated images per other concept (default 2)")
    ev.add_argument("--n-neighbour", type=int_at_least(0), default=20,
                    help="generated images of each of the 5 concepts nearest the target, for the worst-case "
                         "collateral (default 20: one image moves the estimate by 0.05; 0: --n-other)")
    ev.add_argument("--judge-model", default="embedded", help="CLIP judge, as `slug unlearn --model`")
    ev.add_argument("--judge-pretrained", default=None, help="as `slug unlearn --pretrained`, for the judge")
    ev.add_argument("--judge-family", default="open_clip", choices=["open_clip", "hf_clip"],
                    help="as `slug unlearn --family`, for the judge (default open_clip)")
    ev.add_argument("--steps", type=COUNT, default=25, help="denoising steps (default 25)")
    ev.add_argument("--guidance", type=float_at_least(0.0), default=None,
                    help="guidance scale (default: the pipeline's)")
    ev.add_argument("--seed", type=SEED, default=0, help="seed of the generation plan (default 0)")
    ev.add_argument("--device", default="cpu", help="the pipeline's and the judge's device (default cpu)")
    ev.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads (default: torch's choice)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--out", required=True, help=f"folder for {GEN_EVAL} and generations.png")
    ev.add_argument("--overwrite", action="store_true", help=f"replace the {GEN_EVAL} already in --out")
    ev.set_defaults(func=cmd_eval_sd)
