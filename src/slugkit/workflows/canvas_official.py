"""``slug canvas run``: the official UnlearnCanvas protocol on the user's local copy (issue 15; spec ``baselines.md``
§7.1–§7.3, ``slug-algorithm.md`` §6.2).

Inputs, all local (nothing is downloaded):

* ``--pipeline DIR``: the UnlearnCanvas fine-tuned SD v1.5, diffusers layout (``model_index.json``), loaded by
  :func:`slugkit.integrations.diffusers_sd.load_pipeline_folder`, its scheduler replaced by DDIM (eta 0);
* ``--clip DIR``: the CLIP whose text tower the pipeline's text encoder is (``openai/clip-vit-large-patch14`` saved
  with ``save_pretrained``) — SLUG's gradients are computed on it; the two are hash-checked;
* ``--classifiers DIR``: the benchmark's two judges as safetensors state dicts, ``style50.safetensors`` (51
  outputs: :data:`STYLE_LABELS`) and ``style50_cls.safetensors`` (20: :data:`OBJECTS20`), timm
  ``vit_large_patch16_224`` with a ``Linear(1024, K)`` head, input Resize(224) and Normalize(0.5, 0.5). The official
  files are pickled ``.pth`` checkpoints (key ``model_state_dict``); slugkit does not unpickle files, so convert
  them once yourself (the README's command). An optional ``judges.json`` (``{"arch", "kwargs", "image_size",
  "style_labels", "object_labels"}``) describes other classifiers (the tests' tiny ViTs);
* ``--data DIR``: the dataset, ``DIR/{Style}/{Object}/{n}.jpg`` — SLUG's forget/retain pairs and SalUn's images
  come from it, captioned with the answer set's prompt.

The answer set is the official one: every style of :data:`STYLE_LABELS` (Seed_Images included) × every object,
prompted as UnlearnCanvas's sampling scripts prompt it — ``"A {object} image in {style} style."`` with the style's
underscores replaced by spaces (:data:`PROMPT`) — seeds 188, 288, 588, 688, 888, DDIM 100 steps (eta 0), guidance 9.0
(``--styles``/``--objects``/``--seeds``/``--steps`` declare a subset, recorded in the JSON as the spec's "lite"
protocol asks). Departure: one sampler for every method (the official UCE script samples with LMS). Targets: the 50
styles (not Seed_Images) and the 20 objects. UA/IRA/CRA per target and averaged, time/peak memory/storage of the
unlearning alone — exactly :func:`slugkit.workflows.canvas_lite.run_protocol`, which also runs the embedded canvas.
ESD's concept is ``"{style} Style"`` / ``"An image of {object}"`` (underscores replaced, as its training script); UCE
erases the bare concept name and preserves ``""`` and every other pair's prompt, as its ``train_erase.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..world.canvas import Grid

STYLE_LABELS = ["Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
                "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
                "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
                "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
                "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust",
                "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe",
                "Van_Gogh", "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter"]
OBJECTS20 = ["Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
             "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls"]
SEEDS = [188, 288, 588, 688, 888]
STEPS, GUIDANCE = 100, 9.0
JUDGE_FILES = {"style": "style50.safetensors", "object": "style50_cls.safetensors"}
JUDGE_ARCH = "vit_large_patch16_224"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
PROMPT = "A {object} image in {style} style."  # the official sampling scripts' (the embedded canvas: "An ...")
# The official settings at SD-1.5 scale (each module documents its sources): ESD-x as UnlearnCanvas runs it, the
# CompVis code's 1,000 iterations, Adam lr 1e-5, DDIM 50; canonical SalUn (spec §2.5 — not the UnlearnCanvas port's
# unmasked variant, §2.8) with the port's data and schedule: 3 images per pair, Adam lr 1e-5, 2 epochs over the
# 60 forget images of a style at batch 8 (15 steps); UCE with the UnlearnCanvas port's s_p = max(0.1, 1/|P|) (None).
OFFICIAL_SETTINGS = {"esd": {"iterations": 1000, "lr": 1e-5, "ddim_steps": 50, "which": "esd-x"},
                     "salun": {"steps": 15, "lr": 1e-5, "batch_size": 8, "per_pair": 3},
                     "uce": {"preserve_scale": None}}


def check_grid(styles: list[str], objects: list[str], targets: list[str] | None = None) -> str | None:
    """The usage error of a declared grid (names unknown or repeated, fewer than two per domain — IRA needs another
    concept —, Seed_Images as a target), or None."""
    for flag, given, known in (("--styles", styles, STYLE_LABELS), ("--objects", objects, OBJECTS20)):
        bad = [n for n in given if n not in known]
        if bad:  # "van_gogh" got the 51 names and no hint (trial 38)
            from ..common.text import did_you_mean

            return f"{flag}: unknown {bad[0]!r}; {did_you_mean(bad[0], known)}UnlearnCanvas has {', '.join(known)}"
        if len(set(given)) != len(given):
            return f"{flag}: {[n for n in given if given.count(n) > 1][0]!r} is given twice"
        if len(given) < 2:
            return (f"{flag}: at least two are needed (in-domain retention, IRA, is measured on the others); got "
                    f"{', '.join(given)}")
    if targets and "Seed_Images" in targets:
        return "--targets: Seed_Images is the photo theme UnlearnCanvas judges but never unlearns; name a style"
    return None


class UnlearnCanvasGrid(Grid):
    """The official grid over a local dataset folder; images are read (never drawn) and resized to ``image_size``
    (the generator's resolution: SalUn encodes them with its VAE)."""

    def __init__(self, data_dir, styles=None, objects=None, image_size: int = 512):
        styles = list(styles or STYLE_LABELS)
        super().__init__(styles, list(objects or OBJECTS20), template=PROMPT, capitalize=False,
                         not_targets=["Seed_Images"])
        self.data_dir, self.image_size = Path(data_dir), image_size
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"--data {data_dir}: "
                                    + ("is a file, not a folder" if self.data_dir.exists() else "no such folder")
                                    + " (expected the UnlearnCanvas dataset, "
                                    "DIR/{Style}/{Object}/{n}.jpg)")

    def display(self, style: str) -> str:
        """The style as the official prompts spell it: underscores replaced by spaces."""
        return style.replace("_", " ")

    def uce_prompts(self, target: str) -> tuple[list[str], list[str]]:
        """UCE's official prompts: erase the bare concept name; preserve ``""`` and every other pair's prompt."""
        name = self.display(target) if self.domain_of(target) == "style" else target
        return [name], [""] + [self.prompt(o, s) for s, o in self.other_pairs(target)]

    def check_files(self, progress: bool = False) -> int:
        """Every pair of the grid has images, and each opens as one (``PIL.Image.verify``, no decoding): the number
        checked. ``FileNotFoundError``/``ValueError`` naming the folder or file — before any work."""
        from ..common.progress import vanishing_bar

        n = 0
        have = [s for s in self.styles if (self.data_dir / s).is_dir()]
        if not have:  # "<DIR>/Van_Gogh/Cats: no images; restrict the grid" for a folder that is no dataset (trial 38)
            raise FileNotFoundError(f"--data {self.data_dir} holds none of the grid's {len(self.styles)} style folders "
                                    f"({', '.join(self.styles[:3])}{', …' if len(self.styles) > 3 else ''}): give "
                                    "UnlearnCanvas's data folder, laid out as DIR/{Style}/{Object}/{n}.jpg")
        pairs = [(s, o) for s in self.styles for o in self.objects]
        for s, o in vanishing_bar(pairs, desc="checking the dataset", disable=not progress):
            for f in self.files(s, o):
                try:
                    with Image.open(f) as im:
                        im.verify()
                except Exception as e:
                    raise ValueError(f"--data: {f} is not a readable image ({type(e).__name__}: {e}); remove or "
                                     "replace it") from None
                n += 1
        return n

    def files(self, style: str, obj: str) -> list[Path]:
        """The images of one pair, sorted; ``FileNotFoundError`` naming the folder when it has none."""
        d = self.data_dir / style / obj
        found = sorted(p for p in d.glob("*") if p.suffix.lower() in IMAGE_EXTS) if d.is_dir() else []
        if not found:
            raise FileNotFoundError(f"--data: {d} holds no .jpg/.jpeg/.png images — the UnlearnCanvas layout is "
                                    "DIR/{Style}/{Object}/{n}.jpg; restrict the grid with --styles/--objects to the "
                                    "pairs you have")
        return found

    def images(self, pairs, per_pair: int, seed: int, salt: int) -> tuple[np.ndarray, list[str]]:
        """``per_pair`` images of each pair, drawn without replacement (with, when a folder holds fewer) by
        ``default_rng([seed, salt, s, o])``: uint8 ``[N, image_size, image_size, 3]`` and the prompts."""
        xs, prompts = [], []
        for style, obj in pairs:
            files = self.files(style, obj)
            rng = np.random.default_rng([seed, salt, self.styles.index(style), self.objects.index(obj)])
            pick = rng.choice(len(files), per_pair, replace=len(files) < per_pair)
            for i in pick:
                try:
                    with Image.open(files[int(i)]) as im:
                        im = im.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
                        xs.append(np.asarray(im))
                except OSError as e:
                    raise ValueError(f"--data: {files[int(i)]} cannot be read ({e}); remove or replace it") from None
                prompts.append(self.prompt(obj, style))
        return np.stack(xs), prompts

    def clip_inputs(self, x: torch.Tensor, adapter) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` through the CLIP's own image processor."""
        return torch.stack([adapter.preprocess(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])


def _loose(name: str) -> str:
    """A label as a near miss compares: lowercased, runs of spaces, ``_`` and ``-`` as one ``_``."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


JUDGE_KEYS = ("arch", "kwargs", "image_size", "style_labels", "object_labels")


def _check_spec(spec: dict, path) -> None:
    """``ValueError`` naming ``path`` and the key for a judges.json that would fail later (a traceback after the
    pipeline loaded) or be silently half-used: an unknown key (a misspelt ``arch`` fell back to the default arch
    with the given kwargs), a non-positive ``image_size``, labels that are not a list of distinct names, kwargs that
    are not an object (20th trial)."""
    import difflib

    for k in spec:
        if k not in JUDGE_KEYS:
            near = difflib.get_close_matches(k, JUDGE_KEYS, 1)
            raise ValueError(f"--classifiers: {path} has an unknown key {k!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else "") + f"; keys: {', '.join(JUDGE_KEYS)}")
    size = spec.get("image_size", 224)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--classifiers: {path}: image_size must be a positive integer (pixels), got {size!r}")
    if not isinstance(spec.get("arch", JUDGE_ARCH), str) or not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"--classifiers: {path}: arch must be a timm model name and kwargs an object")
    for k in ("style_labels", "object_labels"):
        v = spec.get(k)
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v)
                              or len(set(v)) != len(v)):
            raise ValueError(f"--classifiers: {path}: {k} must be a non-empty list of distinct names, one per "
                             "classifier output, in output order")


class TimmJudges:
    """The benchmark's style and object classifiers (timm ViTs, safetensors state dicts), predicting indices into a
    grid's styles/objects (−1 for a label outside the grid: counted as wrong)."""

    def __init__(self, style, obj, grid: Grid, style_labels, object_labels, image_size: int = 224):
        self.style, self.object, self.image_size = style.eval(), obj.eval(), image_size
        self.maps = [np.array([grid.styles.index(n) if n in grid.styles else -1 for n in style_labels]),
                     np.array([grid.objects.index(n) if n in grid.objects else -1 for n in object_labels])]

    @classmethod
    def load(cls, folder, grid: Grid, device: str = "cpu") -> "TimmJudges":
        """The two classifiers on ``device``. ``FileNotFoundError`` naming the missing file (and the conversion to do
        for a ``.pth``); ``ValueError`` naming the file for an unreadable or mismatched one or a bad judges.json."""
        import timm
        from safetensors.torch import load_file

        d = Path(folder)
        spec = {}
        if (d / "judges.json").is_file():
            try:
                spec = json.loads((d / "judges.json").read_text())
            except ValueError as e:
                raise ValueError(f"--classifiers: {d / 'judges.json'} is not valid JSON ({e})") from None
            if not isinstance(spec, dict):
                raise ValueError(f"--classifiers: {d / 'judges.json'} must be an object with keys arch, kwargs, "
                                 "image_size, style_labels, object_labels")
        _check_spec(spec, d / "judges.json")
        labels = {"style": spec.get("style_labels", STYLE_LABELS), "object": spec.get("object_labels", OBJECTS20)}
        for task, names in (("style", grid.styles), ("object", grid.objects)):  # a grid name no judge label
            # matches is never "recognised": every method's UA read 100 % (20th trial: lowercased labels)
            missing = [n for n in names if n not in labels[task]]
            if missing:
                near = {_loose(n): n for n in labels[task]}.get(_loose(missing[0]))  # case, spaces, - and _
                raise ValueError(f"--classifiers: the {task} classifier's labels ({task}_labels in "
                                 f"{d / 'judges.json'}, else the official ones) hold no {missing[0]!r}"
                                 + (f" ({len(missing)} of the grid's {task}s missing)" if len(missing) > 1 else "")
                                 + (f" — they spell it {near!r}: labels are matched exactly" if near else "")
                                 + "; the judge could never recognise it, and every method's UA would read 100 %")
        arch = spec.get("arch", JUDGE_ARCH)
        nets = []
        for task, name in JUDGE_FILES.items():
            f = d / name
            if not f.is_file():
                pth = f.with_suffix(".pth")
                hint = (f"; {pth.name} is there: slugkit does not unpickle files — convert it once (README, "
                        "'UnlearnCanvas, the official protocol')" if pth.is_file() else "")
                raise FileNotFoundError(f"--classifiers {d}: {name} is missing{hint}")
            try:
                net = timm.create_model(arch, pretrained=False, num_classes=len(labels[task]), **spec.get("kwargs", {}))
            except Exception as e:
                raise ValueError(f"--classifiers: timm cannot build {arch!r} with {spec.get('kwargs', {})} "
                                 f"({type(e).__name__}: {e}); fix 'arch'/'kwargs' in {d / 'judges.json'}") from None
            if f.stat().st_size == 0:  # said "is not a vit_… (header too small)" (trial 38)
                raise ValueError(f"--classifiers: {f} is empty (0 bytes); write the {task} classifier's state dict "
                                 "there again (README: the conversion)")
            try:
                net.load_state_dict(load_file(str(f)))
            except Exception as e:  # load_state_dict's first line is only its heading: keep the details' start
                msg = " ".join(str(e).split())[:300]
                raise ValueError(f"--classifiers: {f} is not a {arch} with {len(labels[task])} {task} outputs "
                                 f"({type(e).__name__}: {msg}); {name} must hold the {task} classifier's state dict "
                                 "(README: the conversion), or describe it in judges.json") from None
            nets.append(net)
        size = spec.get("image_size", 224)
        try:  # an image_size the classifiers were not built for was a traceback at the first judging (21st trial)
            with torch.no_grad():
                for task, net in zip(JUDGE_FILES, nets):
                    net.eval()(torch.zeros(1, 3, size, size))
        except Exception as e:
            msg = str(e).splitlines()[0][:200]
            raise ValueError(f"--classifiers: the {task} classifier does not take {size}×{size} images "
                             f"({type(e).__name__}: {msg}); set image_size in {d / 'judges.json'} to the size it was "
                             "built for") from None
        return cls(*[n.to(device) for n in nets], grid, labels["style"], labels["object"], size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[N, 3, H, W]`` → (style indices, object indices) into the grid, each ``[N]``."""
        out = [[], []]
        for lo in range(0, len(images), batch_size):
            x = images[lo:lo + batch_size].float().div(255)
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
            x = (x - 0.5) / 0.5
            p = next(self.style.parameters())
            x = x.to(p.device, p.dtype)
            for k, net in enumerate((self.style, self.object)):
                out[k].append(self.maps[k][net(x).argmax(1).cpu().numpy()])
        return np.concatenate(out[0]), np.concatenate(out[1])


class DiffusersGenerator:
    """A diffusers Stable Diffusion pipeline called as the canvas protocol calls a generator:
    ``gen(prompts, seeds, steps=, guidance=)`` → uint8 ``[N, 3, H, W]``, one CPU ``torch.Generator`` per seed (as
    :func:`slugkit.data.generate.pipeline_images`), DDIM eta 0; exposes ``text_encoder``, ``tokenizer``, ``unet``,
    ``scheduler`` for the methods and ``to_latent`` for SalUn."""

    def __init__(self, pipe, batch_size: int = 8):
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.batch_size = pipe, batch_size
        self.text_encoder, self.tokenizer, self.unet = pipe.text_encoder, pipe.tokenizer, pipe.unet
        self.scheduler = pipe.scheduler

    @torch.no_grad()
    def __call__(self, prompts, seeds, steps: int = STEPS, guidance: float = GUIDANCE) -> torch.Tensor:
        from ..data.generate import pipeline_images

        out = []
        for lo in range(0, len(prompts), self.batch_size):
            ims = pipeline_images(self.pipe, list(prompts[lo:lo + self.batch_size]),
                                  [int(s) for s in seeds[lo:lo + self.batch_size]], steps, guidance)
            out += [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in ims]
        return torch.stack(out)

    @torch.no_grad()
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [−1, 1] → the VAE posterior's mean × ``scaling_factor`` (deterministic; the
        SalUn port samples the posterior)."""
        vae = self.pipe.vae
        p = next(vae.parameters())
        return vae.encode(images.to(p.device, p.dtype)).latent_dist.mean * vae.config.scaling_factor


def official_context(pipeline_dir, clip_dir, classifiers_dir, data_dir, *, styles=None, objects=None,
                     steps: int = STEPS, guidance: float = GUIDANCE, seeds=None, device: str = "cpu",
                     batch_size: int = 8, progress: bool = False):
    """A :class:`~slugkit.workflows.canvas_lite.CanvasContext` for the official protocol (module docstring).
    Raises ``FileNotFoundError``/:class:`~slugkit.common.errors.ModelLoadError` naming the missing input, and
    ``ValueError`` when the CLIP's text tower is not the pipeline's text encoder."""
    from ..integrations.diffusers_sd import consumed_text_candidates, load_pipeline_folder, verify_text_encoder
    from ..models.hf_clip import HFClipAdapter
    from .canvas_lite import CanvasContext

    for flag, d in (("--pipeline", pipeline_dir), ("--clip", clip_dir), ("--classifiers", classifiers_dir)):
        if not Path(d).is_dir():  # a file was "no such folder" (twentieth trial)
            raise FileNotFoundError(f"{flag} {d}: " + ("is a file, not a folder" if Path(d).exists() else
                                                        "no such folder"))
    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise FileNotFoundError(f"--pipeline {pipeline_dir}: not a diffusers pipeline folder (no model_index.json); "
                                "pass UnlearnCanvas's checkpoints/diffusion/diffuser/style50 folder")
    cfg = Path(clip_dir) / "config.json"
    try:
        ok = {"text_config", "vision_config"} <= set(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise FileNotFoundError(f"--clip {clip_dir}: not a transformers CLIPModel folder (its config.json has no "
                                "text_config and vision_config); the pipeline's text_encoder/ is not enough — pass "
                                "openai/clip-vit-large-patch14 saved with CLIPModel/CLIPProcessor.save_pretrained")
    grid = UnlearnCanvasGrid(data_dir, styles, objects)
    grid.check_files(progress)  # every pair and image is there before hours of work, not after
    judges = TimmJudges.load(classifiers_dir, grid, device)
    try:
        pipe = load_pipeline_folder(str(pipeline_dir), device)
    except (OSError, ValueError) as e:
        raise ValueError(f"--pipeline {pipeline_dir}: the diffusers pipeline does not load ({e})") from None
    grid.image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    adapter = HFClipAdapter.load(str(clip_dir), device=device)
    mapping = verify_text_encoder(adapter.model, pipe.text_encoder)
    adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder),
                                consumer="text encoder of the UnlearnCanvas pipeline")
    gen = DiffusersGenerator(pipe, batch_size)
    return CanvasContext(adapter, gen, mapping, judges, grid,
                         max_length=pipe.tokenizer.model_max_length, steps=steps, guidance=guidance,
                         seeds=list(SEEDS if seeds is None else seeds), to_latent=gen.to_latent)


__all__ = ["DiffusersGenerator", "GUIDANCE", "OBJECTS20", "OFFICIAL_SETTINGS", "PROMPT", "SEEDS", "STEPS",
           "STYLE_LABELS", "TimmJudges", "UnlearnCanvasGrid", "check_grid", "official_context"]
