"""Decoding image bytes into the 8-bit RGB images every model here expects.

PIL's ``convert("RGB")`` clips instead of scaling for high-bit-depth modes (a 16-bit grey of 40000 becomes pure
white) and drops transparency without looking at it. :func:`to_rgb8` converts by the pixel's meaning instead:

* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``; and ``I``, the 32-bit integer mode Pillow also uses for 16-bit
  PNG/TIFF data) is scaled from 0..65535 to 0..255 (``round(v / 257)``: 40000 → 156). ``I`` values outside
  0..65535 have no known range: :class:`~slugkit.common.errors.ShardError` (the readers skip and count it);
* floating point (``F``) is read as 0..1 (× 255); values outside [0, 1] or not finite: ``ShardError``;
* 16-bit RGB/RGBA PNGs are already reduced to 8 bits by Pillow when they are opened (the high byte);
* transparency (``RGBA``, ``LA``, ``PA``, palette or grey images with a ``transparency`` entry) is composited over
  **white** (what a viewer shows on a white page), instead of exposing whatever colour hides under alpha 0;
* every other mode (``L``, ``P``, ``CMYK``, ``YCbCr``, ``1``, ...) goes through ``convert("RGB")``.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

from ..common.errors import ShardError

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _grey(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb8(img: Image.Image, where: str = "image") -> Image.Image:
    """``img`` as an 8-bit ``RGB`` image of the same size, scaled by mode (see the module docstring).

    Raises :class:`~slugkit.common.errors.ShardError` naming ``where`` for pixel values without a known range."""
    mode = img.mode
    if mode.startswith("I;16"):
        return _grey(np.asarray(img, dtype=np.float64) / 257.0)
    if mode in ("I", "I;32", "I;32L", "I;32B"):
        a = np.asarray(img, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ShardError(f"cannot convert {where} to 8-bit RGB: 32-bit integer pixels outside the 16-bit range "
                             f"0..65535 (min {a.min():g}, max {a.max():g}); convert it to 8 or 16 bits first")
        return _grey(a / 257.0)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ShardError(f"cannot convert {where} to 8-bit RGB: floating-point pixels outside the range [0, 1] "
                             f"(min {np.nanmin(a):g}, max {np.nanmax(a):g}); convert it to 8 bits first")
        return _grey(a * 255.0)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        with warnings.catch_warnings():  # "Palette images with Transparency expressed in bytes ..."
            warnings.simplefilter("ignore")
            rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes (any format PIL reads) into an 8-bit ``RGB`` image (:func:`to_rgb8`).

    Raises :class:`~slugkit.common.errors.ShardError` naming ``where`` (e.g. ``shard:key`` or a file path) for
    bytes that do not decode or pixels without a known range."""
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning (> 89 Mpx) leaked a traceback line (trial
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 24); the image is read like any other
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:  # PIL raises a zoo of exception types for broken files
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__  # no object text
        raise ShardError(f"cannot decode image {where}: {why}"
                         + (" (an empty file)" if not data else "")) from e
    try:
        return to_rgb8(img, where)
    except ShardError:
        raise
    except Exception as e:  # a mode PIL cannot convert (LAB, HSV, ...)
        raise ShardError(f"cannot convert image {where} (mode {img.mode}) to RGB: {e}") from e
