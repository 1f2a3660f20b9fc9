"""open_clip adapter: any open_clip architecture + pretrained tag, ``hf-hub:`` id, local checkpoint, or the embedded model.

Model ids follow open_clip: ``--model ViT-B-32 --pretrained laion400m_e32`` (a tag open_clip downloads and caches),
``--model ViT-B-32 --pretrained /path/to/weights.safetensors`` (a local file), ``--model hf-hub:org/repo``,
``--model local-dir:/path`` or a directory holding ``open_clip_config.json`` + weights, and ``--model embedded``
(the tiny CLIP trained on the embedded synthetic world, shipped in ``slugkit/assets/embedded``). The embedded model
is loaded through exactly the same ``open_clip.create_model_and_transforms`` call as every other id.

Candidate tensors follow the official filters (spec §3.4): every parameter except names containing ``bias``,
``logit_scale``, ``position`` or ``embedding``; LayerNorm gains **are** candidates (the official ``'.ln_'`` filter is
commented out). The tower split is the official one: names containing ``visual`` are vision, all others language.
In open_clip q/k/v live in one tensor (``attn.in_proj_weight``), so every group is a single tensor.

``precision`` (``fp32`` | ``bf16`` | ``fp16``) is autocast over float32 weights (see :mod:`slugkit.models.base`):
the model is always created with open_clip's ``precision="fp32"``, because open_clip's ``"bf16"``/``"fp16"`` cast
the weights (``convert_weights_to_lp``: linear/conv/attention weights in the low dtype, the rest float32), which
changes the tensors a patch is hashed against and makes a float32 input batch crash with a dtype mismatch.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..common.rng import keeps_torch_rng
from .base import (Adapter, ModelLoadError, Stage, autocast_dtype, check_local_weights, check_precision,
                   foreign_folder)
from .hub import offline_unless_reachable, unreachable_note

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded"
# the shipped VLM (a transformers LLaVA on this CLIP's vision tower; slugkit.world.vlm), named here so that the
# integrations (`--consumer llava:embedded`) reach it without the world layer
EMBEDDED_VLM_DIR = EMBEDDED_DIR.parent / "embedded_vlm"
OFFICIAL_EXCLUDE = ("bias", "logit_scale", "position", "embedding")


def _require_open_clip():
    try:
        import open_clip  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ModelLoadError(
            "open_clip is not installed; install the CLIP extra: pip install 'slugkit[clip]'"
        ) from e
    return open_clip


def _checkpoint_file(pretrained: str) -> Path:
    """``--pretrained`` as a local checkpoint: it must exist and be safetensors (never unpickled)."""
    pp = Path(pretrained)
    if not pp.is_file():
        raise ModelLoadError(f"pretrained checkpoint not found: {pp}")
    if pp.suffix != ".safetensors":
        raise ModelLoadError(
            f"{pp}: slugkit loads local checkpoints only as .safetensors (it never unpickles user files). "
            "Convert once with safetensors.torch.save_file(state_dict, 'model.safetensors')."
        )
    check_local_weights(pp)
    return pp


def weights_override(model: str, pretrained: str | None) -> Path | None:
    """The ``--pretrained`` file that replaces the weights of a model given as a folder (``embedded``,
    ``local-dir:DIR``, ``DIR``): its config comes from the folder, its weights from the file — e.g. a checkpoint
    ``slug apply --out`` wrote. It was silently ignored, so a run, its patch and an audit described the folder's
    weights while naming the file (twelfth trial). None for hub ids and names (open_clip reads ``pretrained``
    itself) and when no ``pretrained`` is given. Raises :class:`ModelLoadError` for a tag (``laion400m_e32``) beside
    a folder, a missing file or a file that is not safetensors."""
    if not pretrained or model.startswith("hf-hub:") or not (
            model == "embedded" or model.startswith("local-dir:") or Path(model).is_dir()):
        return None
    if not (Path(pretrained).suffix or "/" in pretrained):
        raise ModelLoadError(f"--pretrained {pretrained!r} is a tag of a named model; {model!r} is a folder that "
                             "carries its own weights: leave --pretrained out, or pass a .safetensors checkpoint of "
                             "the same architecture to use its weights instead")
    return _checkpoint_file(pretrained)


def resolve_model_name(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """Map a user-facing id to the (model_name, pretrained) pair for ``open_clip.create_model_and_transforms``; a
    folder's ``pretrained`` file is loaded afterwards (:func:`weights_override`)."""
    if model == "embedded":
        if not (EMBEDDED_DIR / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"the embedded model is missing from {EMBEDDED_DIR}; reinstall slugkit or run `slug world train "
                f"--out {EMBEDDED_DIR}`"
            )
        return f"local-dir:{EMBEDDED_DIR}", None
    if model.startswith("hf-hub:"):
        return model, None
    if model.startswith("local-dir:"):
        _folder_weights(Path(model.removeprefix("local-dir:")), pretrained)
        return model, None
    p = Path(model)
    if p.is_dir():
        what = foreign_folder(p, "open_clip")
        if what or not (p / "open_clip_config.json").is_file():
            raise ModelLoadError(f"{p} {what or 'is a directory but holds no open_clip_config.json'}")
        _folder_weights(p, pretrained)
        return f"local-dir:{p.resolve()}", None
    if pretrained and (Path(pretrained).suffix or "/" in pretrained):
        _checkpoint_file(pretrained)
    return model, pretrained


def _folder_weights(folder: Path, pretrained: str | None) -> None:
    """A model folder must hold its weights as safetensors, unless ``pretrained`` (a file) supplies them: without a
    weights file open_clip initialises the model randomly with one log line, and a run on it passed its verdict
    (trial 30: an interrupted copy); a ``.bin``/``.pth`` would be unpickled. Raises :class:`ModelLoadError`."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: {'a file, not a model folder' if folder.exists() else 'no such folder'}")
    check_local_weights(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pth", ".pt"))
    if pretrained and not pickled:  # open_clip would read a pickled file there even beside --pretrained
        return
    raise ModelLoadError(f"{folder} holds no weights file (*.safetensors)" + (
        f", only {', '.join(pickled)}: slugkit never unpickles model files; convert it with safetensors' save_file"
        if pickled else ": open_clip would initialise the model randomly; copy its open_clip_model.safetensors "
        "into the folder, or pass --pretrained FILE.safetensors"))


class _OpenClipErrorsRaised(logging.Filter):
    """Drops open_clip's own ``logging.error`` lines: it logs a failed download on the root logger and then raises
    the same text, which :meth:`OpenClipAdapter.load` reports once (the user saw it twice, the first time as
    ``ERROR:root:…``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "/open_clip/" in record.pathname.replace("\\", "/"))


@contextlib.contextmanager
def _errors_raised_not_logged():
    root, flt = logging.getLogger(), _OpenClipErrorsRaised()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _load_weights(net, path: Path, model: str) -> None:
    """``path``'s tensors into ``net`` (every parameter and buffer, same names and shapes; :func:`weights_override`)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = net.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        raise ModelLoadError(
            f"{path} does not fit {model!r}: " + "; ".join(
                f"{what} {len(keys)} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})" for what, keys in
                (("missing", missing), ("unexpected", extra), ("shape differs for", shapes)) if keys)
            + ": pass the --model the checkpoint was saved from")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


class OpenClipAdapter(Adapter):
    family = "open_clip"

    def __init__(self, model, tokenizer, preprocess, model_id: dict, precision: str = "fp32"):
        autocast_dtype(precision)  # an unknown string fails here; the device check comes with each autocast()
        self.model = model
        self.tokenizer = tokenizer
        self._preprocess = preprocess
        self.model_id = model_id
        self.precision = precision
        self._stages: dict[str, list[Stage]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    @keeps_torch_rng
    def load(cls, model: str = "embedded", pretrained: str | None = None, device: str = "cpu",
             precision: str = "fp32", cache_dir: str | None = None) -> "OpenClipAdapter":
        """Load an open_clip model (ids: module docstring) in eval mode on ``device``, float32 weights.

        ``precision``: ``fp32`` | ``bf16`` | ``fp16``, the autocast dtype of every forward (weights stay float32);
        checked before anything is read (``ValueError``: unknown string, ``fp16`` on the CPU, or an autocast torch
        cannot run on ``device``). Raises :class:`ModelLoadError` when the model cannot be loaded (the message says
        how to pass weights offline), and for an open_clip name without ``pretrained``, which open_clip would
        initialise randomly with only a log line."""
        check_precision(precision, device)
        open_clip = _require_open_clip()
        override = weights_override(model, pretrained)
        name, tag = resolve_model_name(model, pretrained)
        if tag is None and not name.startswith(("local-dir:", "hf-hub:")) and name in open_clip.list_models():
            raise ModelLoadError(  # open_clip only logged "initialized randomly" and the pass ran (17th trial)
                f"--model {model!r} without --pretrained would be randomly initialised by open_clip: there is nothing "
                f"to unlearn in it; pass --pretrained TAG (e.g. --model ViT-B-32 --pretrained laion400m_e32) or a "
                "local .safetensors file, or --model local-dir:DIR for a folder with its weights")
        hub = name.startswith("hf-hub:") or bool(tag and not Path(tag).is_file())  # may download
        why = None
        try:
            with offline_unless_reachable() if hub else contextlib.nullcontext() as why, _errors_raised_not_logged():
                net, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=tag, precision="fp32", device=device, cache_dir=cache_dir)
                tokenizer = open_clip.get_tokenizer(name)
            if override is not None:
                _load_weights(net, override, model)
        except ModelLoadError:
            raise
        except Exception as e:
            if "not found in built-ins" in str(e):  # it listed all ~100 open_clip names (3 KB; fifteenth trial)
                is_file = Path(model).is_file()
                raise ModelLoadError(
                    f"{model!r} is not an open_clip model name" + (
                        " (it is a file: a weights file goes in --pretrained, with its architecture in --model, e.g. "
                        "--model ViT-B-32 --pretrained FILE)" if is_file else "") +
                    "; the names: python -c 'import open_clip; print(open_clip.list_models())'; or give a folder "
                    "(local-dir:DIR with open_clip_config.json)") from None
            if tag and Path(tag).is_file():  # a local file open_clip could not load: no network involved (trial 38)
                raise ModelLoadError(
                    f"{tag} does not fit {model!r} (open_clip: {' '.join(str(e).split())[:200]}): pass the --model the "
                    "checkpoint was saved from (its architecture), or --model local-dir:DIR for a folder with "
                    "open_clip_config.json beside it") from None
            raise ModelLoadError(
                f"could not load open_clip model {model!r} (pretrained={pretrained!r}): {' '.join(str(e).split())}."
                f"{unreachable_note(why)} "
                "If this machine has no network, download the weights elsewhere and pass them locally: "
                "--pretrained /path/to/open_clip_model.safetensors, or --model local-dir:/path/to/folder "
                "(open_clip_config.json + open_clip_model.safetensors)."
            ) from e
        net.eval()
        return cls(net, tokenizer, preprocess, {"family": "open_clip", "model": model, "pretrained": pretrained,
                                                "precision": precision}, precision=precision)

    @classmethod
    def from_config(cls, cfg: dict, seed: int = 0, model_id: dict | None = None,
                    precision: str = "fp32") -> "OpenClipAdapter":
        """Build an architecture-exact model with random float32 weights from an open_clip model config (tests,
        timing); ``precision`` as in :meth:`load`."""
        open_clip = _require_open_clip()
        from open_clip.transform import image_transform

        torch.manual_seed(seed)
        net = open_clip.model.CLIP(**cfg).eval()
        ctx = cfg.get("text_cfg", {}).get("context_length", 77)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        size = cfg["vision_cfg"]["image_size"]
        preprocess = image_transform(size, is_train=False)
        return cls(net, tokenizer, preprocess, model_id or {"family": "open_clip", "model": "config", "config": cfg,
                                                             "seed": seed}, precision=precision)

    # ------------------------------------------------------------------ declarations
    def tower_of(self, name: str) -> str:
        return "vision" if "visual" in name else "language"

    def candidate_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not any(s in n for s in OFFICIAL_EXCLUDE)]

    # ------------------------------------------------------------------ encoders and losses
    def preprocess(self, image):
        return self._preprocess(image)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """N×C×H×W float32 images → N×D float32 L2-normalised embeddings (forward under :meth:`autocast`)."""
        return F.normalize(self._forward(self.model.encode_image, images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """N×L int64 token ids → N×D float32 L2-normalised embeddings (forward under :meth:`autocast`)."""
        return F.normalize(self._forward(self.model.encode_text, tokens), dim=-1)

    def retain_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's symmetric CLIP InfoNCE (``ClipLoss``) with the model's learned logit scale (spec §2.2)."""
        fi = self.encode_image(images)
        ft = self.encode_text(tokens)
        scale = self.model.logit_scale.exp()
        logits = scale * fi @ ft.T
        labels = torch.arange(len(fi), device=fi.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    # ------------------------------------------------------------------ staged forward
    def stages(self, tower: str) -> list[Stage]:
        """The tower as stem → each block → head, each run under :meth:`autocast`; the head returns float32."""
        if tower not in self._stages:
            st = self._vision_stages() if tower == "vision" else self._text_stages()
            self._stages[tower] = self.autocast_stages(st)
        return self._stages[tower]

    def _names_under(self, prefix: str) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if n.startswith(prefix)]

    def _vision_stages(self) -> list[Stage]:
        v = self.model.visual
        from open_clip.transformer import VisionTransformer

        if not isinstance(v, VisionTransformer):
            # ModifiedResNet / timm towers: one opaque stage (correct, just no caching inside the tower).
            return [Stage("visual", lambda x, ctx: v(x), self._names_under("visual."))]
        tr = v.transformer
        blocks = list(tr.resblocks)
        stem_params = [f"visual.{n}" for n in ("conv1.weight", "class_embedding", "positional_embedding")]
        stem_params += self._names_under("visual.ln_pre.") + self._names_under("visual.conv1.")
        stages = [Stage("visual.embeds", lambda x, ctx: v._embeds(x), sorted(set(stem_params)))]
        for i, blk in enumerate(blocks):
            stages.append(Stage(f"visual.transformer.resblocks.{i}", _block_fn(blk, tr.batch_first, None),
                                self._names_under(f"visual.transformer.resblocks.{i}.")))
        used = {p for st in stages for p in st.params}
        head_params = [n for n in self._names_under("visual.") if n not in used]

        def head(x, ctx):
            pooled, _ = v._pool(x)
            if v.proj is not None:
                pooled = pooled @ v.proj
            return pooled

        stages.append(Stage("visual.head", head, head_params))
        return stages

    def _text_stages(self) -> list[Stage]:
        m = self.model
        from open_clip.model import CLIP
        from open_clip.transformer import text_global_pool

        if not isinstance(m, CLIP):
            lang = [n for n, _ in m.named_parameters() if self.tower_of(n) == "language"]
            return [Stage("text", lambda x, ctx: m.encode_text(x), lang)]
        tr = m.transformer
        cast = tr.get_cast_dtype()

        def embed(tokens, ctx):
            x = m.token_embedding(tokens).to(cast)
            return x + m.positional_embedding.to(cast)

        stages = [Stage("text.embeds", embed, ["token_embedding.weight", "positional_embedding"])]
        for i, blk in enumerate(tr.resblocks):
            stages.append(Stage(f"transformer.resblocks.{i}", _block_fn(blk, tr.batch_first, m.attn_mask),
                                self._names_under(f"transformer.resblocks.{i}.")))

        def head(x, tokens):
            x = m.ln_final(x)
            x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
            if m.text_projection is not None:
                x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
            return x

        stages.append(Stage("text.head", head,
                            self._names_under("ln_final.") + self._names_under("text_projection")))
        return stages


def _block_fn(blk, batch_first: bool, attn_mask):
    if batch_first:
        return lambda x, ctx: blk(x, attn_mask=attn_mask)
    return lambda x, ctx: blk(x.transpose(0, 1).contiguous(), attn_mask=attn_mask).transpose(0, 1)
