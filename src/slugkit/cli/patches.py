"""``slug apply``, ``revert``, ``inspect`` and ``export`` (``eval-sd``: :mod:`slugkit.cli.evalsd`): patches on
models, checkpoints and consumer folders, and a text-encoder patch as a LoRA file."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from ..common.text import printable
from .args import int_at_least, refuse, validate_apply
from .evalsd import add_eval_sd_parser, load_pipeline
from .outputs import out_file_taken, out_inside_run
from .inspect_cmd import say_found


def _load_target(a):
    """A safetensors state dict (--checkpoint) or a model loaded through the adapter (--model/--pretrained). Local
    weights named by --model / --pretrained (a folder's ``*.safetensors``, a ``.safetensors`` file) are checked first:
    a Git LFS pointer is named as one (``WeightsFileError``), not a loader's error."""
    from ..common.weights import check_weights_file
    from ..patch import load_state_dict_file
    from .filekinds import is_patch_file, other_file_of_ours

    for flag, spec in (("--checkpoint", a.checkpoint), ("--pretrained", a.pretrained)):
        if spec and is_patch_file(spec):  # "the model has no tensor named … (did you mean 'patched/…'?)" (trial 38)
            raise ValueError(f"{flag} {printable(spec)} is a slugkit patch's tensor file, not a model: give the "
                             "model's checkpoint (the patch goes in --patch, as its folder)")
        kind = other_file_of_ours(spec) if spec else None
        if kind:  # a gradients file said "no tensor named … (did you mean 'retain/…')", a LoRA "no tensor" (trial 48)
            raise ValueError(f"{flag} {printable(spec)} is {kind}, not a model: give the model's checkpoint")
    if a.checkpoint:
        return load_state_dict_file(a.checkpoint), None
    for spec in (a.model, a.pretrained):
        path = Path(spec.removeprefix("local-dir:")) if spec else None
        if path is not None and path.is_dir():
            for f in sorted(path.glob("*.safetensors")):
                check_weights_file(f, "model weights file")
        elif path is not None and path.suffix == ".safetensors" and path.is_file():
            check_weights_file(path, "model weights file")
    from ..models import load_adapter

    adapter = load_adapter(a.model, a.pretrained, family=a.family)
    return adapter.model, adapter


def _state_of(target):
    import torch

    if isinstance(target, torch.nn.Module):
        return {k: v.detach() for k, v in target.state_dict().items()}
    return target


def cmd_apply(a, revert: bool = False) -> int:
    """`slug apply` / `slug revert`: apply or revert patches on a model, a checkpoint, an SD pipeline or LLaVA; one
    writer per ``--out`` at a time (:func:`slugkit.common.sentinel.one_writer`: two applies into one file both said
    "wrote" and one's model was the other's; trial 49)."""
    from ..common.sentinel import run_as_one_writer

    if msg := _refusal(a, revert):  # before the writer's sentinel, put beside --out: into a patch (verification 67)
        return refuse(msg)
    return run_as_one_writer([getattr(a, "out", None)], "slug revert" if revert else "slug apply",
                             lambda: _apply(a, revert), refuse)


def _refusal(a, revert: bool) -> str | None:
    """What is wrong with `slug apply` / `revert`'s options and --out (nothing loaded, nothing written), or None."""
    msg = validate_apply(a, revert)
    if msg:
        return msg
    if a.llava == "embedded":  # the shipped VLM (`slug demo --target vlm` patches it), as --pipeline embedded
        from ..world.vlm import VLM_DIR

        a.llava, a.llava_label = str(VLM_DIR), "the embedded VLM"
    src = a.pipeline if a.pipeline and a.pipeline != "embedded" else a.llava
    if src and (os.path.realpath(a.out) + os.sep).startswith(os.path.realpath(src) + os.sep):
        why = " (a later --full-pipeline copy would carry it along)" if a.pipeline else ""
        return f"--out {a.out} is inside {src}, the model it is written from{why}; write it beside that folder"
    msg = out_inside_run(a.out)  # a model written into RUN/patch/ (or over RUN/result.json) mixes with that run
    if msg:
        return msg
    for given in a.patch:  # --out onto the patch's own files replaced the patch with the model (new-user trial)
        folder = os.path.realpath(say_found(given, "--patch"))
        if a.out and (os.path.realpath(a.out) + os.sep).startswith(folder + os.sep):
            where = "is the patch folder" if os.path.realpath(a.out) == folder else "is inside the patch"  # v. 66
            return f"--out {a.out} {where} {given}; writing there would destroy the patch: choose a path outside it"
    return out_file_taken(a)  # after the checks above: its "pass --overwrite" led to them (verification 66)


def _apply(a, revert: bool) -> int:
    from ..patch import apply_patches, combine_patches, describe, load_patch, revert_patch, save_state_dict_file

    patches = [load_patch(p) for p in a.patch]
    from ..patch.summary import composed_line, sequential_run_line, verdict_line

    # said once the apply has worked: they stood above a refusal of --out, two messages for one mistake (v. 65)
    notes = [] if revert else [line for line in [verdict_line(path, p.meta) for path, p in zip(a.patch, patches)]
                               + [sequential_run_line(a.patch), composed_line(a.patch)] if line]
    if a.pipeline or a.llava:
        if os.path.lexists(a.out) and not os.path.isdir(a.out):  # it was moved aside without a word (trial 26)
            return refuse(f"--out {a.out} exists and is not a folder; --{'pipeline' if a.pipeline else 'llava'} "
                          "writes a model folder there: choose another --out, or remove that file first")
        with step_hint(a.patch, revert):
            return _apply_to_folder(a, patches, revert, notes)
    from ..patch.summary import family_mismatch

    why = family_mismatch(a.family, [p.meta for p in patches])
    if why:
        return refuse(why)
    if a.family is None:  # the patch's own adapter (an SD demo's patch, hf_clip, failed under open_clip: 8th trial)
        named = {p.meta.get("adapter") for p in patches} & {"open_clip", "hf_clip"}
        a.family = named.pop() if len(named) == 1 else "open_clip"
    target, _ = _load_target(a)
    saved = target  # what --out writes: the checkpoint under its own names, edited in place through the view
    if a.checkpoint:  # a lone tower saved without its prefix (transformers 5's CLIPTextModel): seen as the patch names
        from ..integrations.towers import checkpoint_tower_view

        target, prefix = checkpoint_tower_view(target, [n for p in patches for n in p.meta["tensors"]])
        if prefix:
            print(f"note: {printable(a.checkpoint)} holds a lone CLIP tower saved without {prefix!r} (as "
                  f"transformers 5 saves a {'CLIPTextModel' if prefix == 'text_model.' else 'CLIPVisionModel'}); the "
                  f"patch's {prefix}* tensors are matched to it", file=sys.stderr)
    with step_hint(a.patch, revert):
        if revert:  # all or nothing, as apply: several patches are reverted as one (a sequential run's steps: chained)
            revert_patch(target, combine_patches(patches))
        else:
            apply_patches(target, patches)
    if a.out:  # a checkpoint keeps its header (metadata, layout): revert after apply gives it back byte for byte
        save_state_dict_file(_state_of(saved), a.out, template=a.checkpoint)
    say(notes)
    for p in patches:
        print(describe(p))
    verb = "reverted" if revert else "applied"
    print(f"{verb} {len(patches)} patch(es)"
          + (f"; wrote {printable(a.out)}" if a.out else " (verified; use --out to save)"))
    return 0


@contextlib.contextmanager
def step_hint(given: list, revert: bool = False, audit: bool = False):
    """A :class:`~slugkit.patch.PatchMismatchError` of applying a sequential run's later step alone gets what to do
    (:func:`slugkit.patch.summary.sequential_step_hint`) in place of "load the base model the patch was made for",
    the model given; ``audit``: `slug audit` takes one --patch, so it is told to audit on the earlier steps'
    checkpoint (--pretrained)."""
    from ..patch import PatchMismatchError
    from ..patch.summary import sequential_step_hint

    try:
        yield
    except PatchMismatchError as e:
        hint = "" if revert else sequential_step_hint(given, audit)
        if not hint:
            raise
        text = str(e)
        cut = text.find(" Load the base model the patch was made for")
        text = text[:cut] + " The model was not modified." if cut > 0 else text
        raise PatchMismatchError(f"{text}{hint}") from None


def say(notes: list[str]) -> None:
    """The patches' provenance notes (:func:`slugkit.patch.summary.verdict_line`, ``sequential_run_line``) on
    stderr."""
    for line in notes:
        print(line, file=sys.stderr)


def _apply_to_folder(a, patches, revert: bool, notes: list[str]) -> int:
    """`slug apply --pipeline DIR | --llava DIR --patch P --out DIR2`: write the SD pipeline's text encoder (SDXL:
    the one the patch belongs to) or the whole LLaVA model, patched (or reverted), as a loadable folder; ``notes``
    (:func:`say`) once it is written."""
    from ..patch import combine_patches, describe

    patch = combine_patches(patches)
    if a.pipeline:
        from ..integrations.diffusers_sd import save_patched_text_encoder

        if a.pipeline == "embedded" and a.full_pipeline:
            raise ValueError("--full-pipeline: the embedded text-to-image model is not a diffusers pipeline; without "
                             "--full-pipeline its patched text encoder is written (as `slug export --pipeline embedded`"
                             " reads it)")
        if a.pipeline == "embedded":  # refused before the model loads (verification 62), a run folder as one
            from ..integrations.towers import check_out_outside  # (it said "holds files slug did not write": 65)

            check_out_outside(None, a.out, "pipeline")
            if os.path.isdir(a.out):
                from ..common.files import check_replaceable

                check_replaceable(a.out, a.overwrite, "slugkit_patch.json")
        source = load_pipeline("embedded") if a.pipeline == "embedded" else a.pipeline
        save_patched_text_encoder(source, patch, a.out, full_pipeline=a.full_pipeline, revert=revert,
                                  overwrite=a.overwrite, encoder=a.text_encoder, clip_skip=a.clip_skip)
        what = (("the embedded text-to-image pipeline" if a.pipeline == "embedded" else printable(a.pipeline))
                + f"'s text encoder; wrote {printable(a.out)} "  # it read "embedded's" (verification 66)
                f"({'pipeline' if a.full_pipeline else 'text encoder'})")
    else:
        from ..integrations.llava import save_patched_llava

        save_patched_llava(a.llava, patch, a.out, revert=revert, overwrite=a.overwrite)
        label = getattr(a, "llava_label", None) or printable(a.llava)
        # a backend file, not only tokenizer_config.json (it said "model + processor" of such a folder; trial 27)
        tokenizer = any((Path(a.out) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                              "spiece.model"))
        what = f"{label}'s vision tower; wrote {printable(a.out)} (model + processor)"
        if not tokenizer:  # it said "model + processor" of a folder AutoProcessor cannot load (trial 26)
            what = f"{label}'s vision tower; wrote {printable(a.out)} (the model only)"
            print(f"warning: {printable(a.llava)} holds no tokenizer (tokenizer.json, tokenizer.model, vocab.json), "
                  f"so AutoProcessor cannot load {printable(a.out)}: copy the tokenizer files from the model's source",
                  file=sys.stderr)
    say(notes)
    print(describe(patch))
    print(f"{'reverted' if revert else 'applied'} on {what}")
    return 0


def _text_encoders(spec: str):
    """``--pipeline`` for `slug export`: the embedded pipeline, or an object holding only the text encoder(s) of a
    diffusers pipeline folder (``text_encoder/``, SDXL's ``text_encoder_2/`` too; in their stored dtype, offline): the
    UNet and VAE are not needed to write a LoRA of the text encoder."""
    if spec == "embedded":
        return load_pipeline(spec)
    from types import SimpleNamespace

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..common.errors import ModelLoadError
    from ..integrations import check_weight_files
    from ..integrations.diffusers_sd import ENCODERS, check_pipeline_folder

    folder = Path(spec)
    check_pipeline_folder(folder)
    encoders = {}
    for name in ENCODERS:
        cfg = folder / name / "config.json"
        if cfg.is_file():
            check_weight_files(folder / name, "pipeline weights file")
            archs = json.loads(cfg.read_text()).get("architectures") or []
            cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel
            encoders[name] = cls.from_pretrained(folder, subfolder=name, dtype="auto", local_files_only=True).eval()
    if not encoders:
        raise ModelLoadError(f"{spec}: the pipeline folder has no text_encoder/ (config.json); a LoRA of a CLIP text "
                             "encoder needs one")
    return SimpleNamespace(**encoders)


def _max_error(text: str) -> float:
    """``--max-error``: a number in (0, 1)."""
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def cmd_export(a) -> int:
    """`slug export --lora PATCH --pipeline DIR|embedded --out FILE`: the patch's text-encoder edit as a LoRA file
    (:mod:`slugkit.patch.lora`). The pipeline's text encoder is hash-checked against the patch's original weights
    exactly as `slug apply --pipeline` does (apply, then revert in memory: bit-exact), so the LoRA is written only
    for the model it reproduces the patch on. One writer per ``--out`` (two exports with --overwrite both said
    "wrote"; verify 50)."""
    from ..common.sentinel import run_as_one_writer

    return run_as_one_writer([getattr(a, "out", None)], "slug export", lambda: _export(a), refuse)


def _export(a) -> int:
    from ..common.files import check_file_target
    from ..integrations.diffusers_sd import apply_patch_to_pipeline, pick_encoder, revert_patch_from_pipeline
    from ..patch import PatchMismatchError, load_patch
    from ..patch.lora import DEFAULT_MAX_ERROR, check_exportable, export_lora

    out = Path(a.out)
    check_file_target(out, "give the .safetensors file to write")
    if out_inside_run(a.out):
        return refuse(out_inside_run(a.out))
    if out.suffix.lower() != ".safetensors":
        return refuse(f"--out {out}: a LoRA is written as .safetensors; use a name ending in .safetensors")
    if (out.parent / "patch.json").is_file():  # before "pass --overwrite", which would end here (verification 66)
        return refuse(f"--out {out} is inside the patch folder {out.parent}; write the LoRA outside it")
    if (out.exists() or out.is_symlink()) and not a.overwrite:
        return refuse(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):  # said after the SVD work (twentieth trial)
        return refuse(f"--out {out}: cannot write in {parent} (read-only or not yours); choose another --out")
    patch = load_patch(say_found(a.lora, "--lora"))
    check_exportable(patch)
    from ..patch.summary import verdict_line

    holder = _text_encoders(a.pipeline)
    encoder = pick_encoder(holder, patch, a.text_encoder)
    try:
        apply_patch_to_pipeline(holder, patch, encoder=encoder, clip_skip=a.clip_skip)
    except PatchMismatchError as e:
        text, cut = str(e), str(e).find(" The patch is already applied to this model")
        if cut > 0:  # apply's "nothing to do (`slug revert` …)" does not fit an export (verification 66)
            text = (text[:cut] + " A LoRA carries the edit onto the unpatched text encoder: give the pipeline the "
                    "patch was made for, not a patched copy.")
        raise PatchMismatchError(f"{a.pipeline} ({encoder}) does not fit the patch, no LoRA written: {text}") from e
    revert_patch_from_pipeline(holder, patch, encoder=encoder)
    max_error = DEFAULT_MAX_ERROR if a.max_error is None else a.max_error
    extra = {"clip_skip": a.clip_skip} if a.clip_skip is not None else None
    lora = export_lora(patch, getattr(holder, encoder), out, prefix=encoder, max_error=a.max_error, rank=a.rank,
                       overwrite=a.overwrite, extra=extra)
    say([line for line in [verdict_line(a.lora, patch.meta)] if line])  # once written, as apply's (not above an error)
    for m in lora.modules:
        print(f"{lora.prefix}.{m.module}: rank {m.rank} of {m.full_rank}, relative error {m.relative_error:.3e}")
    worst = max(m.relative_error for m in lora.modules)
    capped = sorted({m.full_rank for m in lora.modules if a.rank is not None and m.full_rank < a.rank})
    bound = (f"bound {max_error:g}" if a.rank is None else f"forced rank {a.rank}" if not capped
             else f"rank {a.rank} asked, capped at the full rank {'/'.join(map(str, capped))}: exact")
    how = ("StableDiffusionPipeline.load_lora_into_text_encoder(...) on pipe.text_encoder" if a.pipeline == "embedded"
           else f"pipe.load_lora_weights({str(out)!r})")
    print(f"wrote {out}: LoRA of '{printable(patch.concept)}' (patch {patch.fingerprint[:12]}), {len(lora.modules)} "
          f"module(s) of {encoder}, largest relative error {worst:.3e} ({bound}); load it with {how}")
    if a.rank is not None and worst > DEFAULT_MAX_ERROR:  # rank 1 at error 0.51, without a word (trial 43)
        print(f"warning: the forced rank reproduces the patch's edit only to a relative error of {worst:.2g} (the "
              f"default bound is {DEFAULT_MAX_ERROR:g}): this LoRA is not the measured patch, so its removal and "
              "collateral are unmeasured — check it (slug eval-sd) or drop --rank", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    """Add the `apply`, `revert`, `eval-sd`, `export` and `inspect` subcommands to ``sub``."""
    for name, rev in (("apply", False), ("revert", True)):
        ap = sub.add_parser(name, help=f"{name} patch(es) to a model or a safetensors checkpoint")
        ap.add_argument("--patch", action="append", required=True, help="patch folder (repeatable to compose)")
        ap.add_argument("--checkpoint", default=None, help="a .safetensors state dict to patch")
        ap.add_argument("--model", default=None, help="the model to patch, as `slug unlearn --model` (e.g. embedded); "
                                                       "one of --model, --checkpoint, --pipeline, --llava is needed "
                                                       "(default: none)")
        ap.add_argument("--pretrained", default=None, help="with --model: as `slug unlearn --pretrained`")
        ap.add_argument("--family", default=None, choices=["open_clip", "hf_clip"],
                        help="with --model: as `slug unlearn --family` (default: the patch's adapter, e.g. hf_clip "
                             "for a --target sd/vlm demo's patch; open_clip if it names none)")
        ap.add_argument("--out", default=None, help="write the resulting state dict (.safetensors)")
        ap.add_argument("--pipeline", default=None, help="a diffusers Stable Diffusion folder, or 'embedded': write "
                                                         f"its text_encoder/ {'reverted' if rev else 'patched'} into "
                                                         "--out (folder)")
        ap.add_argument("--full-pipeline", action="store_true", help="with --pipeline: --out gets every component "
                                                                     "(hard links), not only text_encoder/")
        ap.add_argument("--llava", default=None, help="a LLaVA model folder, or 'embedded' (the shipped VLM): write "
                                                      f"it with the vision tower {'reverted' if rev else 'patched'} "
                                                      "into --out (folder)")
        ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file, or with --pipeline / "
                                                                 "--llava a non-empty --out folder (default: refuse)")
        ap.add_argument("--text-encoder", default=None, choices=["text_encoder", "text_encoder_2"],
                        help="with --pipeline (SDXL): which text encoder the patch belongs to (default: the one "
                             "whose shapes fit the patch)")
        ap.add_argument("--clip-skip", type=int_at_least(0), default=None, metavar="N",
                        help="with --pipeline: the pipeline is run with diffusers' clip_skip=N, so its UNet reads the "
                             "text encoder's hidden state N layers before the last (1 = the penultimate layer, "
                             "A1111's 'CLIP skip 2'); "
                             + ("informational: revert restores whatever the patch changed"
                                if rev else "a patch of a layer it then never reads is refused")
                             + " (default: none, the last layer)")
        ap.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' and diffusers' "
                                                                     "when a model folder is loaded and written)")
        ap.set_defaults(func=(lambda a, r=rev: cmd_apply(a, revert=r)))

    add_eval_sd_parser(sub)

    ex = sub.add_parser("export", help="write a text-encoder patch as a LoRA file that diffusers' "
                                       "pipe.load_lora_weights(FILE) loads")
    ex.add_argument("--lora", required=True, metavar="PATCH",
                    help="the patch folder to export as a LoRA: a CLIP text-encoder patch (`slug demo --target sd`, "
                         "`slug unlearn --family hf_clip --consumer sd:DIR`)")
    ex.add_argument("--pipeline", required=True, help="the pipeline the LoRA is for: a diffusers Stable Diffusion "
                                                      "folder or 'embedded'; its text encoder must hold the patch's "
                                                      "original weights (hash-checked, as by `slug apply --pipeline`)")
    ex.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    size = ex.add_mutually_exclusive_group()
    size.add_argument("--max-error", type=_max_error, default=None, metavar="E",
                      help="per module, the smallest rank whose relative error ||dW - B A||_F / ||dW||_F is <= E "
                           "(default 1e-3)")
    size.add_argument("--rank", type=int_at_least(1), default=None, metavar="N",
                      help="force rank N in every module (at most its full rank; the error is recorded, not bounded)")
    ex.add_argument("--text-encoder", default=None, choices=["text_encoder", "text_encoder_2"],
                    help="(SDXL) which text encoder the patch belongs to (default: the one whose shapes fit the patch)")
    ex.add_argument("--clip-skip", type=int_at_least(0), default=None, metavar="N",
                    help="the pipeline is run with diffusers' clip_skip=N: a patch of a layer it then never reads is "
                         "refused (default: none)")
    ex.add_argument("--overwrite", action="store_true", help="replace a LoRA slug wrote at --out (default: refuse; "
                                                             "another file is never replaced)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars (when the pipeline is loaded)")
    ex.set_defaults(func=cmd_export)

    from .inspect_cmd import cmd_inspect

    i = sub.add_parser("inspect", help="describe a patch (or a LoRA or model folder slug wrote)")
    i.add_argument("patch", help="a patch folder (or its patch.json); a LoRA `slug export` wrote; a model folder "
                                 "`slug apply` wrote")
    i.add_argument("--json", action="store_true", help="print patch.json's metadata as JSON")
    i.set_defaults(func=cmd_inspect)
