"""The architecture facts a patch was measured on, which its tensor hashes cannot see.

The same weights can be loaded into models that compute different functions: open_clip's ``ViT-B-32`` (GELU) and
``ViT-B-32-quickgelu`` (QuickGELU) hold identical tensors, so the sha256 check of :func:`slugkit.patch.apply_patch`
passes on either, yet the forgetting measured on one does not hold on the other. :func:`architecture_facts` reads
those facts from a live model; :func:`slugkit.patch.make_patch` records them (``architecture=``) in ``patch.json``
under ``architecture``, and :func:`check_architecture` refuses a target whose own facts say otherwise.

Facts are flat ``"<tower>.<fact>"`` keys, for the towers the model holds:

* ``text.activation`` / ``vision.activation`` — open_clip: the MLP activation module of the first residual block
  (``quick_gelu`` for ``QuickGELU``, ``gelu`` for ``nn.GELU``, ``gelu_pytorch_tanh`` for its tanh form);
  transformers: ``hidden_act`` of the tower's config;
* ``text.layer_norm_eps`` / ``vision.layer_norm_eps`` — the final LayerNorm's ``eps`` (open_clip ``ln_final`` /
  ``visual.ln_post``), transformers ``layer_norm_eps``;
* ``text.pool_type`` / ``vision.pool_type`` — open_clip only: how the tower pools its tokens.

transformers models are recognised by their config: ``CLIPModel`` (both towers), ``CLIPTextModel`` /
``CLIPTextModelWithProjection`` (text: an SD text encoder), ``CLIPVisionModel`` or any model whose ``vision_config``
is a CLIP vision config (vision: LLaVA). Neither library is imported here: the model is read by duck typing. A
patch without the field (made before it existed, or without ``architecture=``) is checked for nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

from .format import Patch, PatchMismatchError, _base_label

__all__ = ["architecture_facts", "check_architecture"]

_HF_TOWERS = {"clip_text_model": "text", "clip_vision_model": "vision"}


def _first(*values: Any) -> Any:
    """The first value that is not None (modules with ``__len__`` can be falsy, so no ``or``)."""
    return next((v for v in values if v is not None), None)


def _activation_name(module: Any) -> str | None:
    if module is None:
        return None
    cls = type(module).__name__
    if cls == "QuickGELU":
        return "quick_gelu"
    if cls == "GELU":
        return "gelu" if getattr(module, "approximate", "none") == "none" else "gelu_pytorch_tanh"
    return cls.lower()


def _open_clip_tower(facts: dict, tower: str, transformer: Any, final_ln: Any, pool: Any) -> None:
    blocks = getattr(transformer, "resblocks", None)
    if blocks is not None and len(blocks):
        act = _activation_name(getattr(getattr(blocks[0], "mlp", None), "gelu", None))
        if act:
            facts[f"{tower}.activation"] = act
    if isinstance(getattr(final_ln, "eps", None), float):
        facts[f"{tower}.layer_norm_eps"] = float(final_ln.eps)
    if isinstance(pool, str):
        facts[f"{tower}.pool_type"] = pool


def _hf_configs(cfg: Any) -> dict[str, Any]:
    """Tower → transformers config of that CLIP tower, from a model's config."""
    kind = getattr(cfg, "model_type", "")
    if kind in _HF_TOWERS:
        return {_HF_TOWERS[kind]: cfg}
    out = {}
    for tower in ("text", "vision"):
        sub = getattr(cfg, f"{tower}_config", None)
        if getattr(sub, "model_type", "") == f"clip_{tower}_model":
            out[tower] = sub
    return out


def architecture_facts(model: Any) -> dict[str, Any]:
    """The output-changing architecture facts of an open_clip ``CLIP`` / ``CustomTextCLIP`` or a transformers CLIP
    model (or a model holding a CLIP tower: an SD text encoder, LLaVA), as flat ``"<tower>.<fact>"`` keys (module
    docstring); ``{}`` for anything else (a state dict, an unknown module). Never raises, imports neither library."""
    facts: dict[str, Any] = {}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "model_type"):
        for tower, c in sorted(_hf_configs(cfg).items()):
            act = getattr(c, "hidden_act", None)
            if act is not None:
                facts[f"{tower}.activation"] = act if isinstance(act, str) else getattr(act, "__name__", str(act))
            if isinstance(getattr(c, "layer_norm_eps", None), (int, float)):
                facts[f"{tower}.layer_norm_eps"] = float(c.layer_norm_eps)
        return facts
    text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower apart
    text_transformer = _first(getattr(model, "transformer", None), getattr(text, "transformer", None))
    if text_transformer is not None:
        _open_clip_tower(facts, "text", text_transformer,
                         _first(getattr(model, "ln_final", None), getattr(text, "ln_final", None)),
                         _first(getattr(model, "text_pool_type", None), getattr(text, "pool_type", None)))
    visual = getattr(model, "visual", None)
    if visual is not None:
        _open_clip_tower(facts, "vision", getattr(visual, "transformer", None), getattr(visual, "ln_post", None),
                         getattr(visual, "pool_type", None))
    return facts


def check_architecture(target: Any, patch: Patch, what: str = "model") -> None:
    """Refuse (:class:`PatchMismatchError`, nothing written) when ``patch`` records ``architecture`` facts that
    ``target``'s own facts (:func:`architecture_facts`) contradict; facts only one side knows are not compared, so a
    state dict or a patch without the field passes. The message names each fact with both values."""
    want = patch.meta.get("architecture")
    if not isinstance(want, Mapping) or not want:
        return
    have = architecture_facts(target)
    diffs = [f"{k} is {want[k]!r} in the patch's model, {have[k]!r} in this {what}"
             for k in sorted(want) if k in have and have[k] != want[k]]
    if diffs:
        raise PatchMismatchError(
            f"cannot apply patch (concept {patch.meta.get('concept')!r}): it was made on a model of another "
            f"architecture: {'; '.join(diffs)}. The same weights compute something else there, so the measured "
            f"forgetting would not hold. Load the base model as the patch was made ({_base_label(patch.meta)!r}: "
            f"open_clip a '-quickgelu' model name or quick_gelu for QuickGELU; transformers hidden_act in "
            f"config.json), or unlearn again on this one. The {what} was not modified.")
