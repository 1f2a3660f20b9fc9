"""The per-concept benchmark sweeps (`benchmarks/sd_embedded.py`, `vlm_embedded.py`, `all_identities.py`) refuse bad
arguments when they are parsed, naming the option, and never replace a results file without --overwrite: a trial
saw an unknown concept become a "crashed" row with exit 0, `--threads 0` run a 3-minute concept, `--limit 0` divide by
zero, and a one-identity run replace the committed 60-identity results. The summary's worst other concept covers
every other concept (it was the nearest neighbours' alone, which missed cyan circle -0.30)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, args, said", [
    ("sd_embedded", ["--concepts", "Bogus"], "--concepts: unknown name 'Bogus'"),
    ("sd_embedded", ["--concepts", "red triangle,Red Triangle"], "'red triangle' is given twice"),
    ("sd_embedded", ["--threads", "0"], "argument --threads: must be >= 1"),
    ("sd_embedded", ["--json", "benchmarks/results/sd_embedded_all.json"], "exists; pass --overwrite"),
    ("vlm_embedded", ["--first", "2", "--concepts", "Jowen Gormere"], "--first and --concepts exclude each other"),
    ("vlm_embedded", ["--concepts", ""], "names nothing"),
    ("vlm_embedded", ["--json", "src/slugkit/v.json"], "is inside the slugkit package"),
    ("all_identities", ["--limit", "0"], "argument --limit: must be >= 1"),
    ("all_identities", ["--variant", "margin=-1"], "SearchConfig.margin"),
    ("all_identities", ["--rescore", "benchmarks/results/all_identities_paper.json"], "give --json OUT"),
])
def test_bad_arguments_are_refused_before_any_work(name, args, said):
    r = _script(name, *args)
    assert r.returncode == 2 and said in r.stderr, r.stderr[-800:]


def test_the_sd_summary_names_the_worst_other_concept_of_every_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_embedded

    rows = json.loads((ROOT / "benchmarks" / "results" / "sd_embedded_all.json").read_text())["rows"]
    s = sd_embedded.summary(rows)
    ran = [r for r in rows if "refused" not in r and "error" not in r]
    assert s["worst_other_drop_worst"] == max(r["worst"]["drop"] for r in ran) > s["neighbour_drop_worst"]
    assert s["worst_other"].startswith("cyan circle (unlearning red square)")
