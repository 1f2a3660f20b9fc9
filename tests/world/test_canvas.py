"""The embedded canvas renderer (issue 15): styles x objects, deterministic, names checked."""

import numpy as np
import pytest

from slugkit.world import canvas


def test_prompt_is_unlearncanvas_format_and_names_are_checked():
    assert canvas.prompt("moon", "stripes") == "An moon image in Stripes style."
    with pytest.raises(ValueError, match="unknown canvas style 'cubism'.*flat"):
        canvas.prompt("moon", "cubism")
    with pytest.raises(ValueError, match="unknown canvas object 'bear'.*circle"):
        canvas.render("bear", "flat", np.random.default_rng(0))


def test_grid_size_and_determinism():
    assert len(canvas.STYLES) >= 8 and len(canvas.OBJECTS) >= 8
    a, sa, oa = canvas.dataset(2, 7, styles=["dots", "neon"], objects=["arrow", "star"])
    b, _, _ = canvas.dataset(2, 7, styles=["dots", "neon"], objects=["arrow", "star"])
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert list(sa) == [canvas.STYLES.index("dots")] * 4 + [canvas.STYLES.index("neon")] * 4
    assert list(oa[:4]) == [canvas.OBJECTS.index(o) for o in ("arrow", "arrow", "star", "star")]
    c, _, _ = canvas.dataset(2, 8, styles=["dots", "neon"], objects=["arrow", "star"])
    assert not np.array_equal(a, c)


def _one(obj, style, seed=0):
    return np.asarray(canvas.render(obj, style, np.random.default_rng(seed)), np.float32)


def test_styles_differ_where_they_say():
    flat, stripes = _one("square", "flat"), _one("square", "stripes")
    rows = stripes[:, :4].mean(axis=(1, 2))  # the left edge is background: bands of 2 px alternate
    assert np.ptp(rows) > 40 and np.ptp(flat[:, :4].mean(axis=(1, 2))) < 25
    grad = _one("square", "gradient")
    assert grad[:3].mean() - grad[-3:].mean() > 30  # bright top, dark bottom
    neon = _one("circle", "neon")
    assert neon[0, 0].mean() < 60 and neon[16, 16, 1] > 150  # dark background, bright cyan object
    outline = _one("circle", "outline")
    assert outline[16, 16].mean() > 200  # hollow: the centre is background
    mosaic = _one("cross", "mosaic", seed=3)
    blocks = mosaic.reshape(8, 4, 8, 4, 3)
    assert blocks.std(axis=(1, 3)).mean() < 8  # constant 4x4 blocks up to the pixel noise


def test_objects_have_distinct_silhouettes():
    masks = {o: canvas._masks(o, 16, 16, 10)[0] for o in canvas.OBJECTS}
    for a in canvas.OBJECTS:
        for b in canvas.OBJECTS:
            if a < b:
                assert np.abs(masks[a] - masks[b]).sum() > 25, (a, b)
