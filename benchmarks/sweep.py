"""What the per-concept sweeps (``sd_embedded.py``, ``vlm_embedded.py``) share: a demo run whose refusal or crash
becomes a row instead of ending the sweep, and the one-line form of those rows."""

import tempfile
import time
from pathlib import Path


def guarded_run(name: str, run):
    """``(result, None)`` from ``run(out)`` (``out``: a fresh folder path inside a temporary directory), or
    ``(None, row)`` when it refused (``SearchFailed``, ``NothingToUnlearnError``: the row records the reason,
    whether the run left no folder behind and, under ``search``, the refusal's search record when it carries one) or
    crashed (the row records the traceback; the sweep goes on). Either way
    ``row``/the caller's row carries ``timing_s.wall``; the start time is returned as the third value."""
    from slugkit.slug.search import SearchFailed
    from slugkit.workflows.verdict import NothingToUnlearnError

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        try:
            return run(out), None, t
        except (SearchFailed, NothingToUnlearnError) as e:
            row = {"concept": name, "refused": str(e), "refusal_clean": bool(str(e)) and not out.exists(),
                   "passed": False, "timing_s": {"wall": time.perf_counter() - t}}
            if getattr(e, "info", None):  # the search record of a generator/VLM refusal: every step it measured
                row["search"] = e.info
            return None, row, t
        except Exception as e:  # a crash is recorded (a failure, not a refusal) and the sweep goes on
            import traceback

            return None, {"concept": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                          "passed": False, "timing_s": {"wall": time.perf_counter() - t}}, t


def unfinished_line(row: dict) -> str | None:
    """The line of a refused or crashed row (None for a run that finished)."""
    if "error" in row:
        return f"{row['concept']:16s} ERROR: {row['error']}  {row['timing_s']['wall']:.0f} s"
    if "refused" in row:
        return (f"{row['concept']:16s} REFUSED ({'no patch' if row['refusal_clean'] else 'NOT CLEAN'}): "
                f"{row['refused']}  {row['timing_s']['wall']:.0f} s")
    return None


def counts(rows: list[dict]) -> tuple[list[dict], dict]:
    """``(rows that finished, {passed, total, refused, errors, refusals_clean})`` of a sweep."""
    ran = [r for r in rows if "refused" not in r and "error" not in r]
    return ran, {"passed": sum(r["passed"] for r in rows), "total": len(rows),
                 "refused": sum("refused" in r for r in rows), "errors": sum("error" in r for r in rows),
                 "refusals_clean": all(r["refusal_clean"] for r in rows if "refused" in r)}
