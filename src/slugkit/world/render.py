"""The embedded synthetic world: captioned 32x32 images of invented named identities and generic utility classes.

This is the stand-in for "celebrities + ImageNet" that lets slugkit demonstrate unlearning end to end on a CPU,
with no downloads. The design follows the prototype in ``world-notes.md`` ("v2 upright shapes"):

* **Identities.** 60 invented two-part names ("Pellan Korwick" style). Each identity is a unique combination of five
  *shared* attributes -- colour (6) x shape (5) x pattern (3) x border (2) x background tint (3) = 540 combinations,
  of which 60 are drawn with ``random.Random(0)``. Because attributes are shared, identities are *related* (like faces
  are): many pairs share 3 or 4 of the 5 attributes, which is what makes "related identity" accuracy a meaningful
  collateral-damage metric for unlearning. Identity captions only ever name the identity.
* **Utility classes.** 30 colour x shape classes ("red circle") whose images get a random pattern, border and tint.
  Their captions never contain an identity name. A 30-way zero-shot test on them is the ImageNet stand-in.
* **Upright shapes.** Shapes are drawn upright, in a fixed orientation (world-notes section 1, "v1 vs v2"): with
  randomly rotated shapes the patch-8 tiny CLIP only reached 85% utility accuracy (shape recognition was the
  bottleneck), upright shapes reach >= 97%. All five shapes are left-right symmetric, so a horizontal flip is a
  label-preserving augmentation.

Everything is deterministic: the image of (split, kind, class, index) depends only on those four values, through a
numpy Generator seeded with ``[split_seed, kind_id, class, index]``; it never depends on which other classes or how
many samples are requested.

Only PIL and numpy are used here (no torch), so generating data is cheap to import.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from slugkit.common.files import atomic_write_bytes
from slugkit.data.shards import encode_image, write_shard

from .names import (BORDERS, COLOURS, IDENTITIES, IDENTITY_CAPTION_TEMPLATES, IDENTITY_EVAL_TEMPLATES, PATTERNS, SHAPES,
                    TINTS, UTILITY_CAPTION_TEMPLATES, UTILITY_CLASSES, UTILITY_EVAL_TEMPLATES, Identity, UtilityClass,
                    held_out_identities, identity_by_name, identity_caption, identity_names, utility_caption)

__all__ = [  # the world as `from slugkit.world import render as world` sees it (names re-exported from .names)
    "BORDERS", "COLOURS", "IDENTITIES", "IDENTITY_CAPTION_TEMPLATES", "IDENTITY_EVAL_TEMPLATES", "IMAGE_SIZE",
    "Identity", "KINDS", "PATTERNS", "SHAPES", "SPLIT_SEEDS", "TINTS", "UTILITY_CAPTION_TEMPLATES", "UTILITY_CLASSES",
    "UTILITY_EVAL_TEMPLATES", "UtilityClass", "WorldSample", "folder_name", "identity_by_name", "identity_caption",
    "held_out_identities", "held_out_images", "identity_names", "jpeg_roundtrip", "make_sample", "make_samples",
    "render_identity", "render_utility",
    "utility_caption", "write_image_folder", "write_pair_shards",
]

IMAGE_SIZE = 32

# Base RGB values. Foreground colours are saturated; background tints are light and desaturated so every colour
# keeps its contrast against every tint.
_COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 210, 40),
    "purple": (145, 50, 185),
    "cyan": (40, 195, 205),
}
_TINT_RGB: dict[str, tuple[int, int, int]] = {
    "neutral": (200, 200, 200),
    "warm": (235, 200, 160),
    "cool": (160, 195, 235),
}
_COLOUR_JITTER = 12.0  # std of the per-channel jitter of the shape colour
_TINT_JITTER = 10.0  # std of the per-channel jitter of the background
_NOISE_SIGMA = 5.0  # per-pixel gaussian noise (world-notes: sigma 5)
# Shape radius as a fraction of the image side: 0.24-0.34, i.e. 7.7-10.9 px (a polygon's circumradius). Large
# enough that the patch-8 ViT can tell the five outlines apart, small enough to leave room for random positions.
_RADIUS_RANGE = (0.24, 0.34)
_SUPERSAMPLE = 4  # masks are drawn at 4x and box-downsampled, i.e. anti-aliased edges

# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------

_S = IMAGE_SIZE * _SUPERSAMPLE
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
# Diagonal stripes with a period of 4 px, dots on a 4-px grid (world-notes section 1). The offsets are random.
_STRIPE_BASE = (_XX + _YY) % 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Upright polygon of ``shape`` (in supersampled pixel coordinates); ``None`` for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.82  # about the circle's area
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, centred on its circumcentre
        dy = r * 0.5
        dx = r * np.sqrt(3) / 2
        return [(cx, cy - r), (cx + dx, cy + dy), (cx - dx, cy + dy)]
    if shape == "cross":  # a plus sign
        w = r * 0.34
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "star":  # five points, one pointing straight up
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _shape_masks(shape: str, cx: float, cy: float, r: float, outline: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Anti-aliased fill and outline coverage masks (float32 in [0, 1], 32x32)."""
    s = _SUPERSAMPLE
    cx, cy, r = cx * s, cy * s, r * s
    poly = _shape_polygon(shape, cx, cy, r)

    def draw(width: int | None) -> np.ndarray:
        img = Image.new("L", (_S, _S), 0)
        d = ImageDraw.Draw(img)
        if poly is None:
            box = [cx - r, cy - r, cx + r, cy + r]
            if width is None:
                d.ellipse(box, fill=255)
            else:
                d.ellipse(box, outline=255, width=width)
        else:
            if width is None:
                d.polygon(poly, fill=255)
            else:
                d.polygon(poly, outline=255, width=width)
        small = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32) * (1.0 / 255.0)

    fill = draw(None)
    line = draw(int(1.5 * s)) if outline else None
    return fill, line


def _render(colour: str, shape: str, pattern: str, border: str, tint: str, rng: np.random.Generator,
            spread: float = 1.0) -> Image.Image:
    """Draw one 32x32 image. All randomness comes from ``rng`` (drawn in a fixed order).

    ``spread`` scales the shape's offset from the image centre (1: anywhere it fits, the world's images; 0.25: near
    the centre, the embedded text-to-image model's training images). It does not change what ``rng`` draws.
    """
    # Size and position: the shape always lies fully inside the image.
    r = rng.uniform(*_RADIUS_RANGE) * IMAGE_SIZE
    margin = r + 1.0
    cx = rng.uniform(margin, IMAGE_SIZE - margin)
    cy = rng.uniform(margin, IMAGE_SIZE - margin)
    if spread != 1.0:
        c = IMAGE_SIZE / 2
        cx, cy = c + spread * (cx - c), c + spread * (cy - c)
    fg = np.asarray(_COLOUR_RGB[colour], np.float32) + rng.normal(0.0, _COLOUR_JITTER, 3).astype(np.float32)
    bg = np.asarray(_TINT_RGB[tint], np.float32) + rng.normal(0.0, _TINT_JITTER, 3).astype(np.float32)
    offset = int(rng.integers(0, 4))
    offset2 = int(rng.integers(0, 4))
    noise = rng.normal(0.0, _NOISE_SIGMA, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)

    # Shape colour per pixel, with the pattern.
    shade = np.ones((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    if pattern == "striped":
        shade[(_STRIPE_BASE + offset) % 4 < 2] = 0.5
    elif pattern == "dotted":
        shade[((_XX + offset) % 4 == 0) & ((_YY + offset2) % 4 == 0)] = 0.3
    elif pattern != "plain":
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    fill, line = _shape_masks(shape, cx, cy, r, border == "outline")

    img = bg[None, None, :] * (1.0 - fill[..., None]) + (fg[None, None, :] * shade[..., None]) * fill[..., None]
    if line is not None:  # a dark outline along the shape's edge
        dark = np.float32(25.0)
        img = img * (1.0 - line[..., None]) + dark * line[..., None]
    img = img + noise
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def render_identity(identity: Identity, rng: np.random.Generator) -> Image.Image:
    """A 32x32 RGB image of ``identity`` (its fixed attributes; random size, position, jitter and noise)."""
    return _render(identity.colour, identity.shape, identity.pattern, identity.border, identity.tint, rng)


def render_utility(cls: UtilityClass, rng: np.random.Generator) -> Image.Image:
    """A 32x32 RGB image of utility class ``cls`` with a random pattern, border and tint."""
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    border = BORDERS[int(rng.integers(len(BORDERS)))]
    tint = TINTS[int(rng.integers(len(TINTS)))]
    return _render(cls.colour, cls.shape, pattern, border, tint, rng)


# ----------------------------------------------------------------------------------------------------------------
# Samples, splits, writers
# ----------------------------------------------------------------------------------------------------------------

SPLIT_SEEDS: dict[str, int] = {"train": 1, "test": 2, "pool": 3, "val": 4}
KINDS: dict[str, int] = {"identity": 0, "utility": 1}


@dataclass
class WorldSample:
    key: str
    image: Image.Image
    caption: str
    kind: str  # "identity" | "utility"
    label: int  # index into IDENTITIES or UTILITY_CLASSES
    class_name: str


def make_sample(split: str, kind: str, label: int, i: int) -> WorldSample:
    """Sample ``i`` of class ``label`` of ``kind`` in ``split``; a pure function of those four values."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], KINDS[kind], label, i])
    if kind == "identity":
        ident = IDENTITIES[label]
        caption = identity_caption(ident, int(rng.integers(len(IDENTITY_CAPTION_TEMPLATES))))
        image = render_identity(ident, rng)
        name = ident.name
    else:
        cls = UTILITY_CLASSES[label]
        caption = utility_caption(cls, int(rng.integers(len(UTILITY_CAPTION_TEMPLATES))))
        image = render_utility(cls, rng)
        name = cls.name
    return WorldSample(f"{split}-{kind}-{label:03d}-{i:05d}", image, caption, kind, label, name)


def held_out_images(identity: Identity, split: str, n: int, start: int = 0) -> list[Image.Image]:
    """``n`` images of a held-out identity (:func:`~slugkit.world.names.held_out_identities`, index < 0) in ``split``,
    each a pure function of (split, identity, i) — seeded ``[split_seed, 2, -index, i]``, a kind id no world sample
    uses — and passed through :func:`jpeg_roundtrip` like the images of the world's folders. Raises ``ValueError``
    for an identity of the world itself (index >= 0) or an unknown split."""
    if identity.index >= 0:
        raise ValueError(f"{identity.name} is one of the world's identities; use make_samples for its images")
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    seeds = ([SPLIT_SEEDS[split], 2, -identity.index, i] for i in range(start, start + n))
    return [jpeg_roundtrip(render_identity(identity, np.random.default_rng(s))) for s in seeds]


def make_samples(
    split: str,
    kind: str,
    per_class: int,
    classes: Iterable[int] | None = None,
    start: int = 0,
) -> list[WorldSample]:
    """``per_class`` samples (indices ``start .. start+per_class-1``) of each class in ``classes`` (default: all).

    Ordered class-major. Images of one (split, kind, class, index) never depend on the other arguments.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    n_classes = len(IDENTITIES) if kind == "identity" else len(UTILITY_CLASSES)
    labels = list(range(n_classes)) if classes is None else [int(c) for c in classes]
    for c in labels:
        if not 0 <= c < n_classes:
            raise ValueError(f"class index {c} out of range for kind {kind!r} (0..{n_classes - 1})")
    return [make_sample(split, kind, c, i) for c in labels for i in range(start, start + per_class)]


def folder_name(class_name: str) -> str:
    return class_name.replace(" ", "_")


def jpeg_roundtrip(image: Image.Image) -> Image.Image:
    """The image as it comes back out of a shard or image folder (JPEG q95, 4:4:4, decoded to RGB)."""
    img = Image.open(io.BytesIO(encode_image(image, "jpg")))
    img.load()
    return img.convert("RGB")


def write_image_folder(samples: Iterable[WorldSample], root: str | Path) -> None:
    """ImageFolder layout ``root/<class_name with _>/<key>.jpg`` plus ``root/classnames.txt``.

    ``classnames.txt`` holds one class name (with spaces) per line, in sorted directory-name order, i.e. line k is
    the class that torchvision's ``ImageFolder`` gives index k.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for s in samples:
        d = folder_name(s.class_name)
        names[d] = s.class_name
        (root / d).mkdir(exist_ok=True)
        (root / d / f"{s.key}.jpg").write_bytes(encode_image(s.image, "jpg"))
    # Include folders already present under root (a folder may be written in several calls).
    for p in root.iterdir():
        if p.is_dir() and p.name not in names:
            names[p.name] = p.name.replace("_", " ")
    text = "".join(names[d] + "\n" for d in sorted(names))
    atomic_write_bytes(root / "classnames.txt", text.encode("utf-8"))


def write_pair_shards(
    samples: list[WorldSample], out_dir: str | Path, prefix: str, per_shard: int = 1000
) -> list[str]:
    """Write (image, caption) pairs as webdataset shards ``out_dir/{prefix}-{k:05d}.tar``; returns their paths."""
    if per_shard < 1:
        raise ValueError("per_shard must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, len(samples), per_shard)):
        path = out_dir / f"{prefix}-{k:05d}.tar"
        write_shard(path, ((s.key, s.image, s.caption) for s in samples[lo : lo + per_shard]))
        paths.append(str(path))
    return paths
