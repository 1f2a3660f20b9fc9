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

The folder is written into a temporary sibling and renamed into place (:func:`slugkit.common.runfolder.run_folder`),
under a lock: processes that need it at the same time wait for the one generating it, then use its copy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..common.errors import OutputExistsError
from ..common.files import atomic_write_bytes
from ..common.progress import vanishing_bar
from ..common.runfolder import out_lock, run_folder
from . import render as world

WORLD_DATA_VERSION = 1
COUNTS = {"pool": (100, 20), "val": (20, 10), "test": (50, 50)}


def default_data_dir() -> Path:
    base = os.environ.get("SLUGKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slugkit")
    return Path(base) / f"world-v{WORLD_DATA_VERSION}"


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _spec() -> dict:
    return {"version": WORLD_DATA_VERSION, "counts": COUNTS, "identities": len(world.IDENTITIES),
            "utility_classes": len(world.UTILITY_CLASSES)}


def _complete(d: Path, spec: dict) -> bool:
    """Whether ``d`` holds the world's data for ``spec`` (its ``world.json`` says so)."""
    try:
        return json.loads((d / "world.json").read_text())["spec"] == json.loads(json.dumps(spec))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _stale(f: Path, spec: dict) -> str:
    """Why ``f`` (a ``world.json``) does not mark a complete world for ``spec``, in words."""
    try:
        got = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        return f"is unreadable ({type(e).__name__})"
    if not isinstance(got, dict) or not isinstance(got.get("spec"), dict):
        return "is not a world.json slug wrote (no spec object)"
    return (f"describes another world (version {got['spec'].get('version')!r}, this slugkit's is "
            f"{spec['version']!r})" if got["spec"].get("version") != spec["version"] else
            "describes another world (its counts differ from this slugkit's)")


def ensure_world_data(data_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Generate the world's data folders under ``data_dir`` unless a complete copy is already there; returns it.

    Generated into a temporary sibling and renamed into place, so ``data_dir`` is complete or absent (an old or
    partial copy is replaced, other files in the folder are kept). Concurrent callers wait for the one writing it."""
    d = Path(data_dir) if data_dir else default_data_dir()
    spec = _spec()
    if _complete(d, spec):
        return d
    with out_lock(d, wait=True):
        if _complete(d, spec):  # written by another process while this one waited
            return d
        other = [m for m in ("result.json", "compare.json", "canvas.json", "curate.json") if (d / m).is_file()]
        if other:  # an old world is a cache and is replaced; another command's run is not (it deleted demos' runs)
            raise OutputExistsError(f"{d} holds a slug run ({other[0]} present), not the world's data; the world "
                                    "is written into a folder of its own: choose another --data-dir (or --out)")
        if (d / "world.json").exists():  # rewritten silently, its backups piling up (twenty-third trial): say why
            print(f"note: {d / 'world.json'} {_stale(d / 'world.json', spec)}; the world's data is written again "
                  "there", file=sys.stderr)
        try:
            with run_folder(d, overwrite=True, marker="world.json") as tmp:
                _write_world(tmp, spec, progress, shown=d)
        except NotADirectoryError:  # said "choose another --out" for --data-dir
            raise NotADirectoryError(f"{d}: is a file, not a folder; the world's data is written into a folder: "
                                     "choose another --data-dir (slug world data: --out)") from None
        except OutputExistsError as e:  # said "--overwrite would delete them", an option neither command has
            files = str(e)[str(e).find("("):str(e).find(")") + 1]
            raise OutputExistsError(f"{d} holds files slug did not write inside the world's folders {files}; the "
                                    "outdated world is rewritten there, which would delete them: move them out, or "
                                    "choose another --data-dir (slug world data: --out)") from None
    return d


def _write_world(d: Path, spec: dict, progress: bool, shown: Path) -> None:
    """Write the splits, name lists and (last) ``world.json`` into ``d``; ``shown``: the folder named in progress."""
    steps = [("pool", None), ("val", "identities"), ("val", "utility"), ("test", "identities"), ("test", "utility")]
    it = steps
    if progress:
        it = vanishing_bar(steps, desc=f"world: writing data to {shown}", unit="part")
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
    atomic_write_bytes(d / "world.json", (json.dumps({"spec": spec}, indent=2) + "\n").encode())


def default_concept() -> str:
    return world.IDENTITIES[0].name


RETAIN_PAIRS = 900


def write_mixed_retain(concepts: list[str], path: str | Path, identity_fraction: float, n: int = RETAIN_PAIRS,
                       seed: int = 0) -> dict:
    """Write a retain shard of ``n`` pairs of which ``round(identity_fraction·n)`` are pairs of the *other*
    identities and the rest utility pairs, all from the world's pool split (disjoint from training, validation and
    test images). Returns the composition.

    The curated default draws the retain set from the pool shards, which are 91% identity pairs (100 per identity,
    20 per utility class): the retain set then covers the very identities the related-accuracy test measures. The
    paper's retain set is a generic LAION shard, in which those identities are rare. This lets a comparison set the
    share explicitly (``slug compare --retain-identity-fraction``); the README's sweep shows how it moves the result.
    """
    import numpy as np

    from ..data.shards import write_shard

    if not 0.0 <= identity_fraction <= 1.0:
        raise ValueError(f"--retain-identity-fraction must lie in [0, 1], got {identity_fraction}")
    excluded = {world.identity_by_name(c).name for c in concepts}
    others = [k for k, ident in enumerate(world.IDENTITIES) if ident.name not in excluded]
    n_id = int(round(identity_fraction * n))
    n_util = n - n_id
    id_per, util_per = COUNTS["pool"][0], -(-n_util // len(world.UTILITY_CLASSES))
    rng = np.random.default_rng([seed, 13])
    id_grid = [(k, i) for k in others for i in range(id_per)]
    util_grid = [(k, i) for k in range(len(world.UTILITY_CLASSES)) for i in range(util_per)]
    if n_id > len(id_grid):
        raise ValueError(f"a retain set of {n} pairs at identity fraction {identity_fraction} needs {n_id} identity "
                         f"pairs; the pool holds {len(id_grid)} of identities other than {sorted(excluded)}")
    chosen = ([("identity", *id_grid[j]) for j in sorted(rng.choice(len(id_grid), n_id, replace=False))] +
              [("utility", *util_grid[j]) for j in sorted(rng.choice(len(util_grid), n_util, replace=False))])
    order = rng.permutation(len(chosen))  # mixed order: the retain batches hold both kinds
    samples = [world.make_sample("pool", *chosen[j]) for j in order]
    write_shard(Path(path), ((s.key, s.image, s.caption) for s in samples))
    return {"retain_identity_fraction": identity_fraction, "identity_pairs": n_id, "utility_pairs": n_util,
            "excludes": sorted(excluded), "seed": seed}


def retain_without(spec: str, concepts: list[str], path: str | Path) -> dict:
    """Write ``spec``'s pairs minus those whose caption names any of ``concepts`` (whole word, as ``slug curate``
    matches) to the shard ``path``; returns counts."""
    from ..data.curate import concept_pattern, matches
    from ..data.folders import iter_pairs
    from ..data.shards import write_shard

    pat = concept_pattern(concepts[0], concepts[1:])
    kept, dropped = [], 0
    for smp in iter_pairs(spec, decode=False):
        if matches(smp.caption, pat):
            dropped += 1
            continue
        kept.append((f"{len(kept):07d}", smp.data, smp.caption, smp.ext if smp.ext != "jpeg" else "jpg"))
    write_shard(Path(path), kept)
    return {"excludes": list(concepts), "kept": len(kept), "dropped": dropped}
