"""The embedded canvas: a tiny UnlearnCanvas (issue 15) — rendering **styles** crossed with **objects**, 32x32.

UnlearnCanvas (baselines.md §7) pairs 60 artistic styles with 20 object classes and prompts a generator with
``"An {object} image in {style} style."``; its two judges are a style classifier and an object classifier. This module
is the same grid at the embedded world's scale: :data:`STYLES` are whole-image renderings (a palette and a texture
each — what a small pixel-space UNet can learn and a small classifier can tell apart), :data:`OBJECTS` are outlines
(the world's five shapes). Every image is drawn from a ``numpy`` generator, so a seed fixes it.

Kept apart from :mod:`slugkit.world.render` (the CLIP world, whose images the shipped CLIP was trained on and whose
bytes must not change).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ..common.rng import keeps_torch_rng
from .render import IMAGE_SIZE, _shape_polygon

OBJECTS: list[str] = ["circle", "square", "triangle", "cross", "star"]
# Styles are named as UnlearnCanvas names them — after artists ("Van_Gogh", "Monet"): here names the embedded CLIP
# knows (whole-word tokens of its identities' names). A made-up word ("stripes", "moon") is a token the CLIP never
# trained: its embedding norm is ~0.12 against ~0.45, changing it moves the text states ~5x less, and a canvas UNet
# conditioned on them drew the asked style in 31% of its images (objects "diamond"/"moon"/"arrow": 7-33%). So the
# objects are the five shape words the CLIP knows, and each style name maps to its look (:data:`STYLE_LOOKS`).
STYLE_LOOKS: dict[str, str] = {"harley": "flat", "wesley": "stripes", "serra": "dots", "kasa": "checker",
                               "holt": "outline", "ford": "gradient", "slan": "neon", "mond": "mosaic"}
STYLES: list[str] = list(STYLE_LOOKS)
PROMPT = "An {object} image in {style} style."  # its training caption (baselines.md §7.1; sampling: "A ...")

_SS = 4  # supersampling of the masks
_RADIUS = (0.26, 0.34)  # circumradius as a fraction of the side
_SPREAD = 0.25  # offset of the centre, as a fraction of the room left (near the centre, as the T2I world's)
_NOISE = 5.0
_JITTER = 12.0
# (background RGB, object RGB) per look; the texture is applied in :func:`render`.
_PALETTE: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "flat": ((200, 200, 200), (40, 50, 120)),
    "stripes": ((230, 230, 230), (200, 40, 40)),
    "dots": ((235, 220, 180), (40, 150, 60)),
    "checker": ((215, 215, 215), (235, 200, 40)),
    "outline": ((240, 240, 240), (20, 20, 20)),
    "gradient": ((240, 150, 60), (20, 20, 20)),
    "neon": ((15, 15, 25), (40, 230, 230)),
    "mosaic": ((60, 140, 140), (230, 120, 170)),
}
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


def _masks(obj: str, cx: float, cy: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased (fill, outline) coverage of ``obj``, float32 [32, 32] in [0, 1]; the outline is the fill less
    its erosion by 1.5 px (drawn at 4x and box-downsampled)."""
    s, n = _SS, IMAGE_SIZE * _SS
    cx, cy, r = cx * s, cy * s, r * s
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    if obj == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_shape_polygon(obj, cx, cy, r), fill=255)
    inner = img.filter(ImageFilter.MinFilter(2 * int(1.5 * s) + 1))
    line = Image.fromarray(np.asarray(img) - np.asarray(inner))

    def small(im: Image.Image) -> np.ndarray:
        return np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), np.float32) / 255.0

    return small(img), small(line)


def render(obj: str, style: str, rng: np.random.Generator) -> Image.Image:
    """One 32x32 RGB image of ``obj`` in ``style``. Random: size, position, palette jitter, texture phase and pixel
    noise, drawn from ``rng`` in a fixed order. ``ValueError`` for an unknown object or style."""
    check(obj, style)
    r = rng.uniform(*_RADIUS) * IMAGE_SIZE
    c = IMAGE_SIZE / 2
    cx = c + _SPREAD * (rng.uniform(r + 1, IMAGE_SIZE - r - 1) - c)
    cy = c + _SPREAD * (rng.uniform(r + 1, IMAGE_SIZE - r - 1) - c)
    look = STYLE_LOOKS[style]
    bg0, fg0 = (np.asarray(v, np.float32) for v in _PALETTE[look])
    bg = bg0 + rng.normal(0, _JITTER, 3).astype(np.float32)
    fg = fg0 + rng.normal(0, _JITTER, 3).astype(np.float32)
    ph, ph2 = int(rng.integers(0, 4)), int(rng.integers(0, 4))
    noise = rng.normal(0, _NOISE, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    fill, line = _masks(obj, cx, cy, r)
    back = np.broadcast_to(bg, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    front = np.broadcast_to(fg, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if look == "stripes":  # horizontal bands, 4 px period, over the whole image
        band = ((_YY + ph) % 4 < 2)[..., None]
        back = np.where(band, back * 0.62, back)
        front = np.where(band, front * 0.62, front)
    elif look == "dots":  # dark dots on a 4 px grid, everywhere
        dot = (((_XX + ph) % 4 == 0) & ((_YY + ph2) % 4 == 0))[..., None]
        back, front = np.where(dot, back * 0.3, back), np.where(dot, front * 0.3, front)
    elif look == "checker":  # 4 px black and white cells behind the object
        cell = (((_XX + ph) // 4 + (_YY + ph2) // 4) % 2 == 0)[..., None]
        back = np.where(cell, back * 0.2, back)
    elif look == "outline":  # no fill: the outline only
        fill = line
    elif look == "gradient":  # top: the palette's orange, bottom: purple
        t = (_YY / (IMAGE_SIZE - 1))[..., None].astype(np.float32)
        back = back * (1 - t) + np.asarray((90, 40, 140), np.float32) * t
    img = back * (1 - fill[..., None]) + front * fill[..., None]
    if look == "neon":  # a glow around the object
        glow = np.asarray(Image.fromarray((line * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)),
                          np.float32)[..., None] / 255.0
        img = img + fg * np.clip(1.6 * glow, 0, 1) * (1 - fill[..., None])
    if look == "mosaic":  # 4x4 blocks, each the mean of its pixels
        img = img.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).repeat(4, 0).repeat(4, 1)
    img = img + noise
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


class Grid:
    """A styles × objects grid, its prompt and its answer set: what the UnlearnCanvas protocol needs to know of a
    benchmark besides its models. :data:`EMBEDDED` is the embedded canvas; the official UnlearnCanvas grid
    (:class:`slugkit.workflows.canvas_official.UnlearnCanvasGrid`) reads its images from disk instead of drawing them.

    Subclasses give :meth:`images` (training/forget images of pairs) and :meth:`clip_inputs` (those images as the
    CLIP that computes SLUG's gradients reads them)."""

    def __init__(self, styles, objects, template: str = PROMPT, capitalize: bool = True, not_targets=()):
        self.styles, self.objects = list(styles), list(objects)
        self.template, self.capitalize = template, capitalize
        self.not_targets = list(not_targets)  # styles judged but never unlearned (UnlearnCanvas's Seed_Images)

    def display(self, style: str) -> str:
        """The style as prompts spell it."""
        return style.capitalize() if self.capitalize else style

    def check(self, obj: str, style: str) -> None:
        """``ValueError`` naming the known objects/styles for an unknown one."""
        if obj not in self.objects:
            raise ValueError(f"unknown canvas object {obj!r}; expected one of {', '.join(self.objects)}")
        if style not in self.styles:
            raise ValueError(f"unknown canvas style {style!r}; expected one of {', '.join(self.styles)}")

    def prompt(self, obj: str, style: str) -> str:
        """``"An {object} image in {style} style."`` with the names checked (the style capitalised if the grid
        says so)."""
        self.check(obj, style)
        return self.template.format(object=obj, style=self.display(style))

    def domain_of(self, target: str) -> str:
        """"style" or "object"; ``ValueError`` names the known ones."""
        if target in self.styles:
            return "style"
        if target in self.objects:
            return "object"
        raise ValueError(f"unknown canvas target {target!r}; styles: {', '.join(self.styles)}; objects: "
                         f"{', '.join(self.objects)}")

    def names(self, domain: str) -> list[str]:
        return self.styles if domain == "style" else self.objects

    def target_pairs(self, target: str) -> list[tuple[str, str]]:
        """The (style, object) pairs whose prompt names ``target``."""
        if self.domain_of(target) == "style":
            return [(target, o) for o in self.objects]
        return [(s, target) for s in self.styles]

    def other_pairs(self, target: str) -> list[tuple[str, str]]:
        """Every (style, object) pair whose prompt does not name ``target``."""
        tp = set(self.target_pairs(target))
        return [(s, o) for s in self.styles for o in self.objects if (s, o) not in tp]

    def uce_prompts(self, target: str) -> tuple[list[str], list[str]]:
        """UCE's (erase, preserve) prompts: every pair prompt naming ``target`` / every other pair prompt."""
        return ([self.prompt(o, s) for s, o in self.target_pairs(target)],
                [self.prompt(o, s) for s, o in self.other_pairs(target)])

    def answer_plan(self, per_pair: int, seed_base: int = 50_000, styles=None, objects=None,
                    seeds: list[int] | None = None) -> list[tuple[str, str, str, int]]:
        """UnlearnCanvas's answer set: ``(style, object, prompt, seed)`` for every pair, with the fixed ``seeds``
        (the official 188, 288, 588, 688, 888) or ``per_pair`` seeds seed_base + 100·pair + i (pair = style index ·
        |objects| + object index)."""
        out = []
        for style in styles or self.styles:
            for obj in objects or self.objects:
                pair = self.styles.index(style) * len(self.objects) + self.objects.index(obj)
                ss = seeds if seeds is not None else [seed_base + 100 * pair + i for i in range(per_pair)]
                out += [(style, obj, self.prompt(obj, style), sd) for sd in ss]
        return out

    def judge_plan(self, pipe, judges, plan, steps: int = 20, guidance: float | None = None):
        """Generate ``plan`` (:meth:`answer_plan` rows; DDIM ``steps``) and judge it: ``(true styles, true objects,
        predicted styles, predicted objects, images)``, index arrays ``[N]`` and uint8 ``[N, 3, H, W]``."""
        imgs = pipe([p for _, _, p, _ in plan], [sd for *_, sd in plan], steps=steps,
                    **({} if guidance is None else {"guidance": guidance}))
        ps, po = judges.predict(imgs)
        return (np.array([self.styles.index(s) for s, *_ in plan]),
                np.array([self.objects.index(o) for _, o, *_ in plan]), ps, po, imgs)

    def images(self, pairs, per_pair: int, seed: int, salt: int) -> tuple[np.ndarray, list[str]]:
        """``per_pair`` images of each (style, object) in ``pairs`` and their prompts: uint8 ``[N, H, W, 3]``."""
        raise NotImplementedError

    def clip_inputs(self, x: torch.Tensor, adapter) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` → the CLIP's pixel input ``[N, 3, S, S]``."""
        raise NotImplementedError


class EmbeddedGrid(Grid):
    """The embedded canvas: :data:`STYLES` × :data:`OBJECTS`, images drawn by :func:`render`."""

    def images(self, pairs, per_pair: int, seed: int, salt: int) -> tuple[np.ndarray, list[str]]:
        """Pair (s, o) draws from ``default_rng([seed, salt, s, o])`` (``salt`` keeps the callers' image sets
        apart)."""
        xs, prompts = [], []
        for style, obj in pairs:
            rng = np.random.default_rng([seed, salt, self.styles.index(style), self.objects.index(obj)])
            for _ in range(per_pair):
                xs.append(np.asarray(render(obj, style, rng)))
                prompts.append(self.prompt(obj, style))
        return np.stack(xs), prompts

    def clip_inputs(self, x: torch.Tensor, adapter) -> torch.Tensor:
        from .train import normalise  # bit-identical to the embedded CLIP's eval transform

        return normalise(x)


EMBEDDED = EmbeddedGrid(STYLES, OBJECTS)
check, prompt, domain_of, target_pairs = EMBEDDED.check, EMBEDDED.prompt, EMBEDDED.domain_of, EMBEDDED.target_pairs
answer_plan, judge_plan, render_pairs = EMBEDDED.answer_plan, EMBEDDED.judge_plan, EMBEDDED.images


def dataset(per_pair: int, seed: int, styles=None, objects=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_pair`` renders of every (style, object): uint8 images ``[N, 32, 32, 3]``, style and object indices
    ``[N]`` (into :data:`STYLES` / :data:`OBJECTS`); pair (s, o) draws from ``default_rng([seed, 15, s, o])``."""
    styles, objects = list(styles or STYLES), list(objects or OBJECTS)
    pairs = [(s, o) for s in styles for o in objects]
    x, _ = render_pairs(pairs, per_pair, seed, 15)
    return (x, np.repeat([STYLES.index(s) for s, _ in pairs], per_pair),
            np.repeat([OBJECTS.index(o) for _, o in pairs], per_pair))


# ----------------------------------------------------------------------------------------------------------------
# The shipped canvas: generator, judges, answer set
# ----------------------------------------------------------------------------------------------------------------

CANVAS_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded_canvas"
UNET_FILE, CONFIG_FILE = "unet.safetensors", "canvas_config.json"
JUDGE_FILES = {"style": "style_judge.safetensors", "object": "object_judge.safetensors"}
NOT_SHIPPED = (f"the embedded canvas is missing from this installation ({CANVAS_DIR}); reinstall slugkit, or write "
               "one with `slug world train-canvas --out DIR` and pass --canvas-model DIR")


def _require_shipped(canvas_dir) -> None:
    """``ModelLoadError`` (:data:`NOT_SHIPPED`) when no folder is given and the package holds no canvas, and when
    the folder's model was trained on another grid than :data:`STYLES` × :data:`OBJECTS` (an older canvas)."""
    import json

    from slugkit.models.base import ModelLoadError

    if canvas_dir is None and not (CANVAS_DIR / CONFIG_FILE).is_file():
        raise ModelLoadError(NOT_SHIPPED)
    if canvas_dir is not None:
        from slugkit.models.base import check_model_folder

        check_model_folder(canvas_dir, "--canvas-model: give the folder `slug world train-canvas --out DIR` wrote")
    cfg = Path(canvas_dir or CANVAS_DIR) / CONFIG_FILE
    if cfg.is_file():
        try:
            meta = json.loads(cfg.read_text())
            if not isinstance(meta, dict) or "unet" not in meta:
                raise ValueError("no 'unet' section")
        except ValueError as e:
            raise ModelLoadError(f"{cfg} is not a canvas config ({e}); write the model again with `slug world "
                                 "train-canvas --out DIR` and pass that folder as --canvas-model DIR") from None
        if (meta.get("styles", STYLES), meta.get("objects", OBJECTS)) != (STYLES, OBJECTS):
            raise ModelLoadError(f"{cfg.parent} holds a canvas trained on styles {meta.get('styles')} x objects "
                                 f"{meta.get('objects')}; this slugkit's canvas is {STYLES} x {OBJECTS}: write a "
                                 "new one with `slug world train-canvas --out DIR`")


class CanvasNet(torch.nn.Module):
    """A judge: 3x3 convolutions 32-32-pool-64-pool-64, global average pooling, a linear head; input ``[N, 3, 32,
    32]`` in [−1, 1], output logits ``[N, classes]``."""

    def __init__(self, n_classes: int):
        super().__init__()
        nn = torch.nn
        self.f = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                               nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(64, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class CanvasJudges:
    """The benchmark's two classifiers (UnlearnCanvas's style and object ViTs, here :class:`CanvasNet`)."""

    def __init__(self, style: CanvasNet, obj: CanvasNet):
        self.style, self.object = style.eval(), obj.eval()

    @classmethod
    @keeps_torch_rng
    def load(cls, canvas_dir: str | os.PathLike | None = None) -> "CanvasJudges":
        from safetensors.torch import load_file

        _require_shipped(canvas_dir)
        d = Path(canvas_dir) if canvas_dir else CANVAS_DIR
        nets = []
        for task, n in (("style", len(STYLES)), ("object", len(OBJECTS))):
            f = d / JUDGE_FILES[task]
            if not f.is_file():
                from slugkit.models.base import ModelLoadError

                raise ModelLoadError(f"{f} is missing: {d} is not a complete canvas model; write one with `slug "
                                     "world train-canvas --out DIR` and pass it as --canvas-model DIR")
            net = CanvasNet(n)
            try:
                net.load_state_dict(load_file(str(f)))
            except Exception as e:  # a truncated or foreign file: name it
                from slugkit.models.base import ModelLoadError

                raise ModelLoadError(f"{f} is not a canvas judge with {n} classes ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200]}); write the model again with `slug world "
                                     "train-canvas --out DIR`") from None
            nets.append(net)
        return cls(*nets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[N, 3, 32, 32]`` (a pipeline's output) → (style indices, object indices), each ``[N]``."""
        x = images.float().div(127.5).sub(1)
        return self.style(x).argmax(1).numpy(), self.object(x).argmax(1).numpy()


class CanvasPipeline:
    """The canvas generator: the embedded text-to-image pipeline (:class:`slugkit.world.t2i.EmbeddedT2IPipeline` —
    the embedded CLIP's text tower, DDIM, classifier-free guidance) around the canvas UNet."""

    @staticmethod
    def from_parts(unet, clip=None):
        from .t2i import pipeline_with_unet

        return pipeline_with_unet(unet, clip)

    @staticmethod
    @keeps_torch_rng
    def load(canvas_dir: str | os.PathLike | None = None, clip=None):
        """The shipped canvas generator (or the one in ``canvas_dir``); ``ModelLoadError`` names a missing file."""
        from .t2i import EmbeddedT2IPipeline

        from slugkit.models.base import ModelLoadError

        _require_shipped(canvas_dir)
        d = Path(canvas_dir) if canvas_dir else CANVAS_DIR
        try:
            return EmbeddedT2IPipeline.load(d, clip, files=(CONFIG_FILE, UNET_FILE),
                                            hint=f"{d} is not a complete canvas model; write one with `slug world "
                                                 "train-canvas --out DIR` and pass it as --canvas-model DIR")
        except ModelLoadError:
            raise
        except Exception as e:  # a truncated or foreign UNet file: name it
            raise ModelLoadError(f"{d / UNET_FILE} does not load as this canvas's UNet ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); write the model again with `slug world "
                                 "train-canvas --out DIR`") from None
