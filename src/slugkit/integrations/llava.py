"""LLaVA (``transformers.LlavaForConditionalGeneration``): carry a SLUG patch of the CLIP vision tower into the VLM,
and measure identity recognition.

LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``) uses the frozen ``openai/clip-vit-large-patch14-336`` as its vision tower
and feeds the language model the patch tokens of ``hidden_states[vision_feature_layer]`` (−2: the output of the
second-to-last encoder layer). So the last encoder layer, ``post_layernorm`` and ``visual_projection`` are never read:
editing them changes nothing in the VLM (spec §7 [AMBIGUOUS], §9.1.11). :func:`consumed_vision_candidates` keeps only
encoder layers the VLM reads. The official notebook swaps the whole tower (``llava.vision_tower.vision_model =
edited_clip.vision_model``); :func:`apply_patch_to_llava` writes only the patched tensors, in place, hash-checked, and
:func:`revert_patch_from_llava` restores the exact bytes.

The official notebook has no scoring code; :func:`name_match` implements the recommended rule (case-insensitive
whole-word match of the full name or the last name) and :func:`identity_recognition` the accuracy per identity.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..common.files import atomic_dir
from ..patch import Patch, PatchMismatchError, tensor_sha256
from .towers import (CLIP_TOWER_PREFIX, TowerMismatchError, apply_to_consumer, check_out_outside, check_weight_files,
                     find_tower, layer_names, patched_folder_hint, takes_patch_path, tower_map, verify_tower,
                     write_provenance)

WHAT = "LLaVA vision tower"
QUESTION = "What's the name of the person in this image?"
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # the LLaVA-1.5 prompt of the official notebook


def vision_tower_map(clip_model: nn.Module, llava: nn.Module) -> dict[str, str]:
    """CLIPModel name → LLaVA name for every vision-tower parameter, e.g. (transformers 5)
    ``vision_model.encoder.layers.3.mlp.fc1.weight`` → ``model.vision_tower.encoder.layers.3.mlp.fc1.weight``."""
    return tower_map(clip_model, llava, "vision")


def verify_vision_tower(clip_model: nn.Module, llava: nn.Module) -> dict[str, str]:
    """Refuse (:class:`~slugkit.integrations.TowerMismatchError`, naming the first differing tensor) unless every
    tensor of LLaVA's vision tower equals the CLIP vision tensor it corresponds to (SHA-256, cast to LLaVA's dtype)."""
    return verify_tower(clip_model, llava, "vision", WHAT)


def verify_llava_folder(where: str, adapter, n: int) -> int:
    """``--consumer llava:DIR``: the vision tensors the LLaVA folder's safetensors hold for its consumed layers
    (``0 .. n − 1``) and embeddings must equal this CLIP's (SHA-256, the CLIP's cast to the file's dtype), read tensor
    by tensor (a 7B LLaVA's language model is never read). Keys ``[model.]vision_tower.[vision_model.]REST`` match the
    CLIP's ``vision_model.REST``. Configs alone let a patch judged on one CLIP land in a tower that differs in a layer
    it does not edit (verify 45). Returns the number of tensors checked (0: no safetensors, or none named so); raises
    :class:`~slugkit.integrations.TowerMismatchError` naming the first that differs."""
    from safetensors import safe_open

    params = dict(adapter.model.named_parameters())
    checked = 0
    for f in sorted(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if "vision_tower." not in key:
                    continue
                name = "vision_model." + key.split("vision_tower.", 1)[1].removeprefix("vision_model.")
                layer = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name)
                if name not in params or "post_layernorm" in name or (layer and int(layer.group(1)) >= n):
                    continue
                b, a = sf.get_tensor(key), params[name].detach()
                if tuple(a.shape) != tuple(b.shape) or tensor_sha256(a.to(b.dtype)) != tensor_sha256(b):
                    raise TowerMismatchError(
                        f"--consumer llava:{where}: {WHAT} tensor {key} ({f.name}) differs from the CLIP tensor "
                        f"{name}: this LLaVA was not built on this CLIP, so an edit of the CLIP cannot be carried "
                        "over; use the CLIP its vision tower was made from" + patched_folder_hint(where))
                checked += 1
    return checked


def consumed_vision_layer_count(num_hidden_layers: int, vision_feature_layer: int | Sequence[int]) -> int:
    """How many encoder layers (0 .. n−1) reach the language model.

    ``hidden_states[j]`` is the output after ``j`` layers (``j = 0``: the embeddings after ``pre_layrnorm``), so
    index ``k`` (negative from the end of the ``L + 1`` states) reads layers ``0 .. (k mod (L+1)) − 1``; for a list
    of indices the deepest one counts.
    """
    ks = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    n_states = num_hidden_layers + 1
    for k in ks:
        if not -n_states <= k < n_states:
            raise ValueError(f"vision_feature_layer {k} is out of range for {num_hidden_layers} layers")
    return max(k % n_states for k in ks)


def consumed_vision_layers(llava: nn.Module) -> int:
    """:func:`consumed_vision_layer_count` for a loaded LLaVA (its config and its tower's actual depth)."""
    _, tower = find_tower(llava, "vision")
    return consumed_vision_layer_count(len(tower.encoder.layers), llava.config.vision_feature_layer)


def consumed_vision_candidates(adapter, llava: nn.Module) -> list[str]:
    """The adapter's HF candidates that LLaVA consumes: ``vision_model.encoder.layers.{i}.*`` for
    ``i < consumed_vision_layers(llava)``. With ``vision_feature_layer = −2`` the last layer is out, and so are
    ``post_layernorm`` and ``visual_projection`` (never read) and every text tensor."""
    names = adapter.all_candidate_names() if hasattr(adapter, "all_candidate_names") else adapter.candidate_names()
    return layer_names(names, "vision", consumed_vision_layers(llava))


def _llava(llava) -> nn.Module:
    if not (isinstance(llava, nn.Module) and hasattr(getattr(llava, "config", None), "vision_feature_layer")):
        raise TypeError(f"expected a LlavaForConditionalGeneration, got {type(llava).__name__}" +
                        (" (a pipeline: slugkit.integrations.diffusers_sd.apply_patch_to_pipeline)"
                         if hasattr(llava, "text_encoder") else ""))
    return llava


@takes_patch_path
def apply_patch_to_llava(llava: nn.Module, patch: Patch, *, check: bool = True) -> nn.Module:
    """Write the patch (a :class:`~slugkit.patch.Patch` or its folder) into LLaVA's vision tower in place (no copy),
    refused unless it holds the originals (``check=False`` skips that comparison) and the VLM reads every patched
    layer."""
    n = consumed_vision_layers(_llava(llava))
    prefix = CLIP_TOWER_PREFIX["vision"] + "encoder.layers."
    unread = [x for x in patch.names if x.startswith(prefix) and not layer_names([x], "vision", n)]
    if unread:
        raise PatchMismatchError(
            f"the patch edits {unread[0]}, but LLaVA reads vision layers 0..{n - 1} only (vision_feature_layer="
            f"{llava.config.vision_feature_layer}): the edit would have no effect. Restrict the candidates "
            "(--consumer llava:DIR) and unlearn again.")
    apply_to_consumer(llava, patch, "vision", WHAT, check=check)
    return llava


@takes_patch_path
def revert_patch_from_llava(llava: nn.Module, patch: Patch) -> nn.Module:
    """Restore the original bytes of the patched vision-tower tensors (refused unless they hold the patch)."""
    apply_to_consumer(_llava(llava), patch, "vision", WHAT, revert=True)
    return llava


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def load_llava_folder(cls, folder: str | os.PathLike, **kw) -> nn.Module:
    """``cls.from_pretrained(folder)`` offline, in eval mode, refused (``ModelLoadError``) when the folder's
    ``config.json`` does not fit its weights: weights the config has no place for, or tensors it needs that the
    weights lack (initialised at random). A config with 3 vision layers beside 4-layer weights was loaded with the
    fourth dropped, and the refusal that followed blamed the patch (trial 26)."""
    from transformers.utils import logging as hf_logging

    from ..common.errors import ModelLoadError

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its LOAD REPORT table (20+ lines) above our one-line refusal (trial 27)
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kw)
    except (OSError, RuntimeError, ValueError) as e:  # e.g. shapes the weights do not have: a traceback (trial 27)
        said = " ".join(str(e).split())[:300]
        if "ignore_mismatched_sizes" in said:  # "look at the above report": the report is not printed
            said = "the weights hold tensors of other shapes than its config.json says"
        raise ModelLoadError(f"{folder}: transformers could not load it ({type(e).__name__}: {said}); give the "
                             "folder as save_pretrained wrote it, config and weights together") from e
    finally:
        hf_logging.set_verbosity(level)
    odd = {k: sorted(info.get(k) or []) for k in ("unexpected_keys", "missing_keys", "mismatched_keys")}
    if any(odd.values()):
        said = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0] if isinstance(v[0], str) else v[0][0]})"
                         for k, v in odd.items() if v)
        raise ModelLoadError(f"{folder}: its config.json does not fit its weights ({said}); give the folder as "
                             "save_pretrained wrote it, config and weights together")
    return model.eval()


@takes_patch_path
def save_patched_llava(llava_or_dir, patch: Patch, out_dir: str | os.PathLike, *, revert: bool = False,
                       overwrite: bool = False, processor=None) -> Path:
    """Write the patched (``revert=True``: reverted) LLaVA as a loadable folder: ``save_pretrained`` (config,
    safetensors shards) plus ``slugkit_patch.json``; from a folder, its processor / tokenizer / chat-template files
    are copied along, so ``out_dir`` loads with ``LlavaForConditionalGeneration.from_pretrained`` and
    ``AutoProcessor.from_pretrained``.

    ``llava_or_dir``: a model object (patched in place for the write, then restored bit-exact), a folder (loaded in
    its stored dtype; its ``*.safetensors`` are checked first, so a Git LFS pointer raises ``ValueError`` naming
    it; an ``out_dir`` inside it is refused) or ``"embedded"`` (the shipped VLM); with an object, ``processor`` is
    saved alongside (without one a ``UserWarning`` says the folder has none). The folder appears atomically; a
    non-empty ``out_dir`` is refused unless ``overwrite``. A patch LLaVA cannot use raises
    :class:`PatchMismatchError` and writes nothing.
    """
    import shutil

    src_dir = None
    if llava_or_dir == "embedded":  # the shipped VLM, as `slug apply --llava embedded` (trial 29)
        from ..models.open_clip import EMBEDDED_VLM_DIR

        llava_or_dir = EMBEDDED_VLM_DIR
    folder = isinstance(llava_or_dir, (str, os.PathLike))
    check_out_outside(Path(llava_or_dir) if folder else None, out_dir, "LLaVA model")  # before any load
    if os.path.isdir(out_dir):  # a non-empty --out is refused before the weights load (verification 61), not after
        from ..common.files import check_replaceable

        check_replaceable(out_dir, overwrite, "slugkit_patch.json")
    if folder:
        from transformers import LlavaForConditionalGeneration

        src_dir = Path(llava_or_dir)
        if not src_dir.is_dir():  # it said "no config.json in it" of a folder that is not there, or of a file
            raise FileNotFoundError(f"{src_dir}: " + ("is a file; pass the LLaVA model folder (one written by "
                                                      "model.save_pretrained(DIR))" if src_dir.exists() else
                                                      "no such folder; pass a folder written by "
                                                      "model.save_pretrained(DIR) or downloaded with "
                                                      "`hf download ID --local-dir DIR`, or 'embedded'"))
        if (src_dir / "model_index.json").is_file():  # it said "no config.json in it" (trial 48)
            raise FileNotFoundError(f"{src_dir} is a diffusers pipeline folder (model_index.json), not a LLaVA: an SD "
                                    "pipeline takes a text-encoder patch through --pipeline DIR")
        if not (src_dir / "config.json").is_file():
            raise FileNotFoundError(f"{src_dir} is not a LLaVA model folder (no config.json in it)")
        try:
            import json

            kind = json.loads((src_dir / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "llava":  # a text_encoder/ or a CLIP folder was built as a default 7B LLaVA: 24 GB, OOM (verify 50)
            raise FileNotFoundError(f"{src_dir} is not a LLaVA model folder: its config.json says model_type "
                                    f"{kind!r}, not 'llava'; pass the folder LlavaForConditionalGeneration."
                                    "save_pretrained wrote")
        check_weight_files(src_dir, "LLaVA weights file")
        model = load_llava_folder(LlavaForConditionalGeneration, src_dir, dtype="auto")
    else:
        model = llava_or_dir
    if processor is not None and not hasattr(processor, "save_pretrained"):
        raise TypeError(f"processor must be the model's processor (AutoProcessor.from_pretrained), got {processor!r}")
    changed = False
    try:
        with atomic_dir(out_dir, overwrite, marker="slugkit_patch.json") as tmp:
            (revert_patch_from_llava if revert else apply_patch_to_llava)(model, patch)
            changed = True
            model.save_pretrained(tmp)
            if src_dir is not None:
                for entry in src_dir.iterdir():
                    # train_report.json (`slug world train-vlm`'s scores of the unpatched model) would be stale
                    skip = entry.name.startswith(".") or entry.name.endswith(_WEIGHT_FILES) or entry.is_dir() \
                        or entry.name == "train_report.json"
                    if entry.is_dir() and entry.name == "clip" and not entry.is_symlink():  # a world VLM's own CLIP
                        shutil.copytree(entry, tmp / entry.name)  # (train-vlm --clip): a revert is whole again
                    elif not skip and not (tmp / entry.name).exists():
                        shutil.copy2(entry, tmp / entry.name)
            elif processor is not None:
                processor.save_pretrained(tmp)
            else:  # a folder AutoProcessor cannot load, without a word (trial 30)
                import warnings

                warnings.warn(f"{out_dir}: written without processor or tokenizer files (a model object was given); "
                              "pass processor=... to save it alongside", stacklevel=3)
            write_provenance(tmp, patch, revert, src_dir)
    finally:
        if src_dir is None and changed:  # the caller's model goes back to its exact bytes
            (apply_patch_to_llava if revert else revert_patch_from_llava)(model, patch)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- asking the VLM
@torch.no_grad()
def ask_name(llava: nn.Module, processor, images: Sequence, question: str = QUESTION, max_new_tokens: int = 50,
             prompt: str = PROMPT, batch_size: int = 8) -> list[str]:
    """Greedy answer of the VLM to ``question`` about each image (the official notebook's prompt and decoding).

    ``images`` are PIL images; returns the decoded new tokens per image, stripped.
    """
    text = prompt.format(question=question)
    device = next(llava.parameters()).device
    dtype = next(llava.parameters()).dtype
    answers: list[str] = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
        out = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers.extend(s.strip() for s in processor.batch_decode(new, skip_special_tokens=True))
    return answers


def name_match(answer: str, full_name: str) -> bool:
    """True when ``answer`` contains ``full_name`` or its last name as whole words, case-insensitively.

    Underscores count as spaces (``Elon_Musk``); whitespace inside the name matches any whitespace. "Musk" and
    "elon musk" match "Elon Musk"; "Muskrat" and "Elon" alone do not.
    """
    words = full_name.replace("_", " ").split()
    if not words:
        raise ValueError("empty name")
    for cand in (words, words[-1:]):
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in cand) + r"(?!\w)"
        if re.search(pattern, answer, flags=re.IGNORECASE):
            return True
    return False


def identity_recognition(llava: nn.Module, processor, images_by_name: Mapping[str, Iterable], *,
                         question: str = QUESTION, max_new_tokens: int = 50, prompt: str = PROMPT,
                         batch_size: int = 8, answers: dict | None = None) -> dict[str, float]:
    """Share of each identity's images whose answer names it (:func:`name_match`); the paper's VLM metric
    (LLaVA-1.5-7B on 10 identities: 99.5 % → 2.8 %). Pass a dict as ``answers`` to receive the raw answers.
    ``images_by_name``: ``{name: [PIL images]}``. Raises ``TypeError`` / ``ValueError`` naming the argument before
    any answer is generated (trial 29: a list, a lone image, ``batch_size=0`` failed deep inside)."""
    _llava(llava)
    if not isinstance(images_by_name, Mapping) or not images_by_name:
        raise TypeError(f"images_by_name must be a non-empty dict {{name: [images]}}, got {images_by_name!r:.60}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if answers is not None and not isinstance(answers, dict):
        raise TypeError(f"answers must be a dict to fill (or None), got {type(answers).__name__}")
    if not callable(processor):
        raise TypeError(f"processor must be the model's processor (AutoProcessor.from_pretrained), got {processor!r}")
    acc = {}
    for name, imgs in images_by_name.items():
        if not isinstance(imgs, Iterable) or hasattr(imgs, "getpixel") or isinstance(imgs, (str, bytes)):
            raise TypeError(f"images_by_name[{name!r}] must be a list of images, got {type(imgs).__name__}")
        imgs = list(imgs)
        if not imgs:
            raise ValueError(f"no images for {name!r}")
        got = ask_name(llava, processor, imgs, question, max_new_tokens, prompt, batch_size)
        if answers is not None:
            answers[name] = got
        acc[name] = sum(name_match(a, name) for a in got) / len(got)
    return acc


__all__ = ["apply_patch_to_llava", "ask_name", "consumed_vision_candidates", "consumed_vision_layer_count",
           "consumed_vision_layers", "identity_recognition", "name_match", "revert_patch_from_llava",
           "save_patched_llava", "verify_vision_tower", "vision_tower_map"]
