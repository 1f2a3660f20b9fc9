"""``--consumer sd:DIR | llava:DIR``: restrict SLUG's candidates to the CLIP tensors a downstream model reads, from
its configuration files alone (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

from .towers import TowerMismatchError, layer_names, same_tower


def consumer_restriction(spec: str, adapter=None, clip_skip: int | None = None):
    """``(predicate, description)`` for ``slug unlearn --consumer SPEC``, read from configs only (no weights).

    * ``sd:DIR_OR_ID`` — a diffusers pipeline folder / id: text layers ``< text_encoder/config.json``'s
      ``num_hidden_layers`` (SD 1.x: all 12 of CLIP-L; SD 2.x: 23 of CLIP-H's 24), minus the last ``clip_skip``
      when the pipeline is run with diffusers' ``clip_skip`` (1 = the penultimate layer; None / 0 = the last). An
      SDXL pipeline (it has a ``text_encoder_2/``) needs ``adapter``: its encoder is the one with the adapter's
      text width, and the consumed tensors follow :func:`slugkit.integrations.diffusers_sd.encoder_reads`;
    * ``llava:DIR_OR_ID`` — a LLaVA folder / id: vision layers read at ``vision_feature_layer``
      (LLaVA-1.5: −2 → 23 of CLIP-L/14-336's 24); ``clip_skip`` does not apply;
    * ``sd:embedded`` / ``llava:embedded`` — the shipped text-to-image model / VLM.

    Raises ``ValueError`` for a malformed spec, a ``clip_skip`` that is negative, leaves no layer or is given for
    LLaVA, and :class:`~slugkit.common.errors.ModelLoadError` when the config cannot be read.
    """
    from ..models.base import ModelLoadError
    from ..models.hub import hub_offline, hub_unreachable, unreachable_note

    kind_s, _, where = spec.partition(":")
    if kind_s not in ("sd", "llava") or not where:
        raise ValueError(f"--consumer must be sd:DIR_OR_ID or llava:DIR_OR_ID, not {spec!r}")
    if clip_skip and kind_s != "sd":
        raise ValueError(f"clip_skip (--clip-skip) applies to sd: consumers only, not {spec!r}")
    if kind_s == "sd" and where == "embedded":  # as `slug apply/export --pipeline embedded` (trial 24)
        return _embedded_sd(clip_skip)
    shown = where
    if kind_s == "llava" and where == "embedded":  # the shipped VLM, as `slug apply --llava embedded`
        from ..models.open_clip import EMBEDDED_VLM_DIR

        where, shown = str(EMBEDDED_VLM_DIR), "embedded"
    if _is_path(where):  # a path, not a hub id: any folder was taken, its text encoder read as transformers' defaults
        _check_consumer_folder(kind_s, where)
    local = Path(where).is_dir() or hub_offline()
    why = None if local else hub_unreachable()  # fail at once, not after ~50 s of retries
    kw = {"local_files_only": local or why is not None}
    try:
        if kind_s == "sd":
            from .diffusers_sd import pipeline_consumption

            n, extra_names, desc = pipeline_consumption(where, adapter, kw, clip_skip)
            kind = "text"
            return (lambda name: bool(layer_names([name], kind, n)) or name in extra_names), desc
        else:
            from transformers import LlavaConfig

            from .llava import consumed_vision_layer_count, verify_llava_folder

            raw, _ = LlavaConfig.get_config_dict(where, **kw)
            if raw.get("model_type") != "llava":  # transformers read a CLIP's or BERT's config as a default LLaVA
                raise ValueError(f"--consumer llava:{where}: its config.json is of a {raw.get('model_type')!r} model, "
                                 "not a LLaVA ('llava'); give the LLaVA model's folder or hub id")
            cfg = LlavaConfig.from_pretrained(where, **kw)
            same_tower(adapter, cfg.vision_config, "vision", f"the LLaVA {where}'s vision tower")
            n = consumed_vision_layer_count(cfg.vision_config.num_hidden_layers, cfg.vision_feature_layer)
            if adapter is not None:  # its weights too, tensor by tensor (configs alone: verify 45)
                verify_llava_folder(where, adapter, n)
            kind, desc = "vision", (f"LLaVA vision tower {shown} (vision_feature_layer={cfg.vision_feature_layer}: "
                                    f"layers 0..{n - 1})")
    except (ValueError, TowerMismatchError):
        raise
    except Exception as e:
        said = " ".join(str(e).split()).rstrip(".")  # transformers' text holds newlines (printed as a literal \n)
        here = f" (and there is no folder {where!r} here)" if "/" in where and not Path(where).exists() else ""
        raise ModelLoadError(f"could not read the consumer's config from {where!r}: {type(e).__name__}: {said}."
                             f"{unreachable_note(why)}{here}") from e
    return (lambda name: bool(layer_names([name], kind, n))), desc


def _is_path(where: str) -> bool:
    """A local path rather than a hub id: it exists, starts like a path, has more parts than ``org/name``, or its
    first part is a folder here (`sd:models/sd15` with models/ present was tried on the hub; trial 25)."""
    parts = where.split("/")
    return (Path(where).exists() or where.startswith((".", "/", "~")) or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def _check_consumer_folder(kind: str, where: str) -> None:
    """A local consumer folder that is not what ``kind`` needs is refused (``sd:`` an empty folder or a data folder
    read as a 12-layer text encoder, transformers' default config: the candidates of a CLIP-H or bigG would have
    been cut to layers 0..11 without a word; trial 24)."""
    from ..models.base import ModelLoadError
    from .towers import check_pipeline_folder

    if kind == "sd":
        try:
            check_pipeline_folder(where)
        except ModelLoadError as e:
            raise ModelLoadError(f"--consumer sd:{e}") from None
    elif not (Path(where) / "config.json").is_file():
        raise ModelLoadError(f"--consumer llava:{where}: " + ("no such folder" if not Path(where).exists() else
                                                              "not a LLaVA model folder (no config.json)")
                             + "; pass a folder written by model.save_pretrained(DIR) or a hub id")


def _embedded_sd(clip_skip: int | None):
    """The embedded text-to-image model reads its text encoder's last hidden state: every text layer."""
    if clip_skip:
        raise ValueError("--clip-skip: the embedded text-to-image model reads the last text layer; it takes none")
    from ..models.convert import embedded_hf_clip

    n = embedded_hf_clip()[0].config.text_config.num_hidden_layers
    return (lambda name: bool(layer_names([name], "text", n))), f"the embedded text-to-image model ({n} text layers)"


def restrict_to_consumer(adapter, spec: str, clip_skip: int | None = None):
    """Restrict ``adapter``'s candidates to what ``spec`` (run with ``clip_skip``; see
    :func:`consumer_restriction`) consumes. Raises ``ValueError`` for an adapter that cannot restrict its
    candidates (not hf_clip), and what :func:`consumer_restriction` raises."""
    if not hasattr(adapter, "restrict_candidates"):
        raise ValueError(f"--consumer needs the hf_clip family (the {adapter.family} adapter cannot restrict its "
                         "candidates to a downstream model)")
    pred, desc = consumer_restriction(spec, adapter, clip_skip)
    return adapter.restrict_candidates(pred, consumer=desc)
