"""Write the embedded world to disk in the same layouts a real run reads (so the demo exercises the real loaders).

Layout of ``data_dir`` (concept-independent, generated once and reused; ``world.json`` is written last and marks a
complete folder):

* ``pool/pool-*.tar`` — webdataset shards of captioned pairs, every identity (100 each) and every utility class
  (20 each): the LAION stand-in that ``slug curate`` draws the forget and retain sets from;
* ``val/identities``, ``val/utility`` — class folders for the step-size search (20 images per identity, 10 per
  utility class);
* ``test/identities``, ``test/utility`` — disjoint class folders for the reported metrics (50 per identity = 3000,
  50 per utility class = 1500: one image moves a figure by ≤ 0.02);
* ``names.txt``, ``identity_templates.txt``, ``utility_templates.txt``.

Every split uses its own seed (``world.SPLIT_SEEDS``), so pool, validation and test images never coincide.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data import world
from ..data.shards import atomic_write_bytes

WORLD_DATA_VERSION = 1
COUNTS = {"pool": (100, 20), "val": (20, 10), "test": (50, 50)}


def default_data_dir() -> Path:
    base = os.environ.get("SLUGKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slugkit")
    return Path(base) / f"world-v{WORLD_DATA_VERSION}"


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def ensure_world_data(data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Generate the world's data folders under ``data_dir`` unless a complete copy is already there."""
    d = Path(data_dir) if data_dir else default_data_dir()
    marker = d / "world.json"
    spec = {"version": WORLD_DATA_VERSION, "counts": COUNTS, "identities": len(world.IDENTITIES),
            "utility_classes": len(world.UTILITY_CLASSES)}
    if marker.is_file():
        try:
            if json.loads(marker.read_text())["spec"] == json.loads(json.dumps(spec)):
                return d
        except (ValueError, KeyError):
            pass
    steps = [("pool", None), ("val", "identities"), ("val", "utility"), ("test", "identities"), ("test", "utility")]
    it = steps
    if progress:
        from tqdm import tqdm

        it = tqdm(steps, desc=f"world: writing data to {d}", unit="part", leave=False)
    for split, part in it:
        n_id, n_util = COUNTS[split]
        if part is None:
            samples = world.make_samples(split, "identity", n_id) + world.make_samples(split, "utility", n_util)
            world.write_pair_shards(samples, d / split, prefix=split, per_shard=2000)
        elif part == "identities":
            world.write_image_folder(world.make_samples(split, "identity", n_id), d / split / part)
        else:
            world.write_image_folder(world.make_samples(split, "utility", n_util), d / split / part)
    _write_lines(d / "names.txt", world.identity_names())
    _write_lines(d / "identity_templates.txt", world.IDENTITY_EVAL_TEMPLATES)
    _write_lines(d / "utility_templates.txt", world.UTILITY_EVAL_TEMPLATES)
    atomic_write_bytes(marker, (json.dumps({"spec": spec}, indent=2) + "\n").encode())
    return d


def default_concept() -> str:
    return world.IDENTITIES[0].name


def world_config(concept: str | list[str], out: str | Path, data_dir: str | Path | None = None, *,
                 progress: bool = True, seed: int = 0, **overrides):
    """The ``UnlearnConfig`` of ``slug demo``: curate the concept from the world's pool shards (100 forget pairs,
    900 retain pairs that never name it) and point validation/test at the world's disjoint class folders.
    A list of concepts is unlearned jointly: 100 forget pairs of each, a retain set naming none of them.

    Returns ``(config, curate_summary, data_dir)``.
    """
    from ..data.curate import curate
    from ..unlearn import UnlearnConfig

    concepts = [world.identity_by_name(c).name for c in ([concept] if isinstance(concept, str) else concept)]
    data = ensure_world_data(data_dir, progress=progress)
    out = Path(out)
    cur = curate(str(data / "pool"), concepts[0], out / "data", aliases=concepts[1:],
                 max_forget=100 * len(concepts), retain=900, seed=seed)
    cfg = UnlearnConfig(
        concept=" + ".join(concepts), concepts=concepts if len(concepts) > 1 else [], out=str(out),
        model="embedded", forget=str(out / "data" / "forget.tar"),
        retain=str(out / "data" / "retain.tar"), val_identities=str(data / "val" / "identities"),
        test_identities=str(data / "test" / "identities"), names=str(data / "names.txt"),
        identity_templates=list(world.IDENTITY_EVAL_TEMPLATES), utility_val=str(data / "val" / "utility"),
        utility_test=str(data / "test" / "utility"), utility_templates=str(data / "utility_templates.txt"),
        seed=seed, progress=progress, **overrides)
    return cfg, cur, data
