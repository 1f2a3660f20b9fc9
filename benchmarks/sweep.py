"""What the benchmark scripts share.

* Every script: its arguments checked when they are parsed, as ``slug`` checks its own (:func:`ints`,
  :func:`name_list`, :func:`folder`; a bad value was a traceback after minutes of work, or ran: ``--threads 0``,
  ``--first -1``, an unknown concept as a "crashed" row, exit 0), the ``--json`` file checked before any work
  (:func:`json_out`: not a folder, not inside the installed package, an existing file replaced only with
  ``--overwrite`` — ``benchmarks/results/`` holds the published figures), SIGTERM unwound like Ctrl-C (:func:`run`: a
  killed script left hidden run folders behind) and exit status 1 when a run crashed.
* The per-concept sweeps (``sd_embedded.py``, ``vlm_embedded.py``): a demo run whose refusal or crash becomes a row
  instead of ending the sweep, and the one-line form of those rows.
"""

import argparse
import difflib
import os
import sys
import tempfile
import time
from pathlib import Path


def ints(lo: int):
    """argparse type: an int >= ``lo`` (``--threads 0`` ran on torch's default, ``--limit 0`` divided by zero)."""
    from slugkit.cli.args import int_at_least

    return int_at_least(lo)


def seed_type():
    """argparse type: a seed in [0, 2^63 - 1], as the CLI's ``--seed`` (a negative one was a traceback after the first
    runs: trial 51)."""
    from slugkit.cli.args import SEED

    return SEED


def floats(lo: float, hi: float):
    """argparse type: a finite number in [lo, hi]."""
    from slugkit.cli.args import float_in

    return float_in(lo, hi)


def folder(must_exist: bool = False):
    """argparse type: a folder path — not empty, not a file (``--data-dir FILE`` was a traceback or a "crashed" row
    after the work, ``--out ''`` wrote into the current folder); ``must_exist``: a model folder to read."""
    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("is empty; give a folder")
        if Path(text).exists() and not Path(text).is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
        if must_exist and not Path(text).is_dir():
            raise argparse.ArgumentTypeError(f"{text}: no such folder")
        return text
    return check


def name_list(ap: argparse.ArgumentParser, flag: str, text: str, known: list[str],
              how: str = "a comma list of names") -> list[str]:
    """The comma list ``text`` of ``flag`` as the ``known`` names it means (case ignored), or ``ap.error`` for an
    empty list, an unknown name (with the nearest) or a name given twice: each became a "crashed" row or a second
    identical run."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        ap.error(f"{flag} {text!r} names nothing; give {how}")
    if len(items) != len(text.split(",")):  # `A,` or `A,,B`: a value lost, as the CLI's lists refuse (trial 51)
        ap.error(f"{flag} {text!r} has an empty item; give each name once, separated by commas")
    by_key = {k.casefold(): k for k in known}
    out = []
    for x in items:
        if x.casefold() not in by_key:
            near = difflib.get_close_matches(x, known, n=1)
            ap.error(f"{flag}: unknown name {x!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                     + (f"; known: {', '.join(known)}" if len(known) <= 20 else
                        f"; {len(known)} are known, e.g. {known[0]!r}"))
        if by_key[x.casefold()] in out:
            ap.error(f"{flag}: {by_key[x.casefold()]!r} is given twice")
        out.append(by_key[x.casefold()])
    return out


def add_json(ap: argparse.ArgumentParser, flag: str = "--json", what: str = "every row and the summary") -> None:
    ap.add_argument(flag, default=None, help=f"write {what} here as JSON (an existing file needs --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help=f"replace an existing {flag} file")


def json_out(ap: argparse.ArgumentParser, path: str | None, overwrite: bool, flag: str = "--json") -> None:
    """Refuse, before any work, a ``--json`` path that is empty, a folder, inside the installed package, under a
    missing folder, or an existing file without ``--overwrite`` (a 1-identity run replaced the committed 60-identity
    results without a word; a folder failed after the work)."""
    if path is None:
        return
    from slugkit.common.files import read_manifest
    from slugkit.common.outputs import out_inside_model, out_inside_run

    p = Path(path)
    written = p.name in ((read_manifest(p.parent) or {}).get("entries") or []) if path.strip() else False
    checks = ((not path.strip(), "is empty; give a file path"), (p.is_dir(), "is a folder; give a file"),
              (bool(out_inside_model(path, {})), "is inside the slugkit package; write it elsewhere"),
              (bool(out_inside_run(path)) or written, "is inside a slug run folder (it could replace the run's own "
                                                     "files, such as a curated set's curate.json); write it elsewhere"),
              (not p.parent.is_dir(), f"cannot be written: {p.parent} is no folder"),
              (p.exists() and not overwrite, "exists; pass --overwrite to replace it, or give another path"))
    why = next((w for bad, w in checks if bad), None)
    if why:
        ap.error(f"{flag} {path} {why}" if path.strip() else f"{flag} {why}")


def run(main) -> None:
    """Run a script's ``main()`` as ``slug`` runs a command: SIGTERM unwinds like Ctrl-C (run folders are removed;
    "terminated", exit 143; Ctrl-C: "interrupted", 130); stdout closed early (``… | head -1``) ends quietly with 141
    (it was a traceback: verification 70); ``main``'s return value is the exit status."""
    from slugkit.common.interrupts import Terminated, handling

    with handling():
        try:
            status = main()
            sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
        except KeyboardInterrupt as e:
            print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
            status = 143 if isinstance(e, Terminated) else 130
        except BrokenPipeError:  # Python docs, "Note on SIGPIPE": stdout to devnull, so the flush at exit is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status = 141
    sys.exit(status or 0)


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


def progress_off() -> None:
    """No transformers/hub progress bars (``Loading weights``) in a script that passes ``progress=False``."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()


def scope_list(ap: argparse.ArgumentParser, text: str, example: str, flag: str = "--scopes") -> list[str]:
    """The ceiling scripts' comma list of parameter-name prefixes: an empty item or one given twice is refused (it ran
    the same edit twice, or dropped an item without a word); whether each names parameters is the script's check."""
    items = [s.strip() for s in text.split(",")]
    if not any(items):
        ap.error(f"{flag} {text!r} names nothing; give e.g. {flag} {example}")
    if not all(items):
        ap.error(f"{flag} {text!r} has an empty item; remove the extra comma")
    twice = next((s for i, s in enumerate(items) if s in items[:i]), None)
    if twice:
        ap.error(f"{flag}: {twice!r} is given twice")
    return items


def failed_checks(checks: dict) -> str:
    """``PASS``, or ``FAIL`` with the names of the checks that failed (a row's ``checks``: ``{name: bool}``)."""
    bad = [k for k, ok in checks.items() if not ok]
    return "PASS" if not bad else "FAIL " + ", ".join(bad)


PER_PROCESS = ("concepts", "first", "all", "scopes", "json", "overwrite", "threads", "merge", "merged_from")


def merge(ap: argparse.ArgumentParser, paths: list[str], json_path: str | None, summarise,
          key: tuple[str, ...] = ("concept", "scope"), partial_ok: bool = False, row_keys: tuple[str, ...] = ()) -> int:
    """``--merge``: the rows of ``--json`` files of runs over disjoint concepts (e.g. two processes, or a sweep
    finished in a later session) as one run — ``summarise(rows, json_path, options, **extra)`` prints the summary
    and writes ``json_path`` (``extra``: the first part's other top-level keys, e.g. the scores before the edit, and
    ``complete``: whether every part was, or — a stopped sweep finished by later parts — whether every concept a part
    was given with ``--concepts`` has its row; the merged file's ``options.concepts`` keeps those not run, so merging
    it again stays incomplete until a part runs them). Refused: a part that is unreadable or another script's (a
    finished row lacks a ``key`` or ``row_keys`` field, or ``checks``), one still running
    (``"complete": false``) unless ``partial_ok`` (its rows are whole rows: the sweep writes a row when its run has
    ended), parts that share a ``key`` (a concept run twice), and parts run with different options (any but
    :data:`PER_PROCESS`: merging them would report one sweep that never ran); a part given twice, a part with no
    rows, one that says it ended without a row for a concept it was given (with ``partial_ok``), and ``--json``
    onto a part (verification 71)."""
    import json

    real = [os.path.realpath(p) for p in paths]
    if twice := next((p for i, p in enumerate(paths) if real[i] in real[:i]), None):
        ap.error(f"--merge {twice}: given twice; give each part once")
    if json_path and os.path.realpath(json_path) in real:
        ap.error(f"--json {json_path} is one of the --merge parts; write the merged file elsewhere")
    rows, options, extra, partial = [], [], {}, []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--merge {path}: not readable JSON ({e})")
        if (not isinstance(part, dict) or part.get("complete") not in (True, False)
                or not isinstance(part.get("rows"), list)
                or not all(isinstance(r, dict) and {*key, *row_keys, "checks"} <= r.keys() for r in part["rows"]
                           if "refused" not in r and "error" not in r)
                or not all(isinstance(r, dict) and "concept" in r for r in part["rows"])):
            ap.error(f"--merge {path}: not a --json file of this script (\"complete\", rows with "
                     f"{', '.join((*key, *row_keys))} and checks)")
        if not part["rows"]:
            ap.error(f"--merge {path}: no rows; nothing to merge (a run that ended before its first concept)")
        given_here = [c.strip() for c in ((part.get("options") or {}).get("concepts") or "").split(",") if c.strip()]
        if partial_ok and part["complete"] is True and (lack := set(given_here) - {r["concept"] for r in part["rows"]}):
            ap.error(f"--merge {path}: says \"complete\": true but has no row for {', '.join(sorted(lack))}, "
                     "which it was given; it is not a part of this script's run")
        if part["complete"] is not True:
            if not partial_ok:
                ap.error(f"--merge {path}: its run has not ended (\"complete\": false); merge it when it has")
            partial.append(path)
        rows += part["rows"]
        options.append(part.get("options") or {})
        extra = extra or {k: v for k, v in part.items() if k not in ("rows", "summary", "options", "complete")}
    for path, opts in zip(paths[1:], options[1:]):
        differ = sorted(k for k in {*opts, *options[0]} - set(PER_PROCESS) if opts.get(k) != options[0].get(k))
        if differ:
            ap.error(f"--merge {path}: run with other options than {paths[0]} ("
                     + ", ".join(f"{k}: {opts.get(k)!r} vs {options[0].get(k)!r}" for k in differ)
                     + "); merge runs of one sweep only")
    seen = [tuple(r.get(k) for k in key) for r in rows]
    if len(set(seen)) != len(seen):
        twice = next(s for i, s in enumerate(seen) if s in seen[:i])
        ap.error(f"--merge: the parts share {' and '.join(key)} {' / '.join(map(str, twice))}; merge runs over "
                 "disjoint concepts")
    given = [o.get("concepts") for o in options]  # each process's --concepts; a merged file keeps its parts' given
    wanted = list(dict.fromkeys(c.strip() for g in given if g for c in g.split(",")))  # so a later merge sees them
    ran = list(dict.fromkeys(r["concept"] for r in rows))
    missing = [c for c in wanted if c not in ran] if all(given) else None  # None: a part was --all / --first
    file = "the merged file says" if json_path else "(no --json: nothing written) it would say"
    merged = {**options[0], "concepts": ",".join(dict.fromkeys([*ran, *(missing or [])])), "json": json_path,
              "merged_from": paths}
    summarise(rows, json_path, merged, **extra, complete=not partial or missing == [])  # written, then said
    if partial and missing != []:
        print(f"note: {len(partial)} part(s) had not ended, or merged one that had not ({', '.join(partial)}): "
              "their finished rows are merged"
              + (f"; not run: {', '.join(missing)}" if missing else "") + f"; {file} \"complete\": false", flush=True)
    elif partial:  # merging a stopped sweep with the parts that finished it (it said "complete": false: 2026-12-04)
        print(f"note: {len(partial)} part(s) had not ended, or merged one that had not ({', '.join(partial)}); every "
              f"concept the parts were given has its row, so {file} \"complete\": true", flush=True)
    return 0


def ceiling_args(ap: argparse.ArgumentParser, summarise, what: str):
    """The ceiling scripts' shared tail of options — ``--threads``, ``--merge`` (runs over disjoint ``what``, e.g.
    identities) and ``--json``/``--overwrite`` — parsed and checked. Returns the arguments, or ``None`` when
    ``--merge`` did the whole job (``summarise`` as :func:`merge` takes it)."""
    ap.add_argument("--threads", type=ints(1), default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--merge", nargs="+", metavar="PART.json", default=None,
                    help=f"no run: merge the --json files of runs over disjoint {what} (e.g. two processes) into "
                         "--json, with the summary recomputed")
    add_json(ap)
    a = ap.parse_args()
    json_out(ap, a.json, a.overwrite)
    if a.merge:
        merge(ap, a.merge, a.json, summarise)
        return None
    return a


def per_scope(rows: list[dict], stats: dict) -> dict:
    """The ceiling scripts' summary: per scope of ``rows`` (first-seen order), ``passed``/``total``, the worst target
    value after (``target[1]``), the slowest run, and for each ``stats`` entry ``name: row -> float`` its
    ``name_median`` and ``name_worst`` (the largest)."""
    import statistics

    out = {}
    for scope in dict.fromkeys(r["scope"] for r in rows):
        rs = [r for r in rows if r["scope"] == scope]
        s = out[scope] = {"passed": sum(r["passed"] for r in rs), "total": len(rs),
                          "target_after_worst": max(r["target"][1] for r in rs),
                          "slowest_s": max(r["timing_s"]["wall"] for r in rs)}
        for key, get in stats.items():
            s[f"{key}_median"], s[f"{key}_worst"] = statistics.median(map(get, rs)), max(map(get, rs))
    return out


def write_complete(json_path: str | None, rows: list[dict], summary: dict, options: dict, complete: bool = True,
                   **extra) -> dict:
    """Write a finished sweep's ``--json`` (``"complete": true``, or false for a merge with a part that had not
    ended; nothing without a path); returns ``summary``."""
    if json_path:
        from slugkit.common.files import write_json

        write_json(json_path, {"rows": rows, "summary": summary, "options": options, **extra, "complete": complete})
    return summary


def print_counts(s: dict, what: str) -> None:
    """The sweeps' first summary lines: ``N/M <what> pass (P%); R refused[, C crashed]`` and, when a fallback made
    some patches, which passes are not SLUG's (``s``: :func:`counts` with ``by_method``)."""
    print(f"{s['passed']}/{s['total']} {what} pass ({s['passed'] / max(s['total'], 1):.0%}); {s['refused']} refused"
          f"{', %d crashed' % s['errors'] if s['errors'] else ''}"
          f"{'' if s['refusals_clean'] else ' (SOME LEFT A RUN FOLDER)'}")
    if said := by_method_line(s):  # a fallback ran: say which passes are not SLUG's
        print(said)


def by_method(ran: list[dict]) -> dict:
    """``{method: {"runs", "passed"}}`` over the rows of runs that wrote a patch: which method made each (SLUG's step,
    ``slug``, or a demo's labelled fine-tune fallback, ``layer-finetune``); rows from before the field are SLUG's."""
    return {m: {"runs": sum(r.get("method", "slug") == m for r in ran),
                "passed": sum(r["passed"] for r in ran if r.get("method", "slug") == m)}
            for m in sorted({r.get("method", "slug") for r in ran})}


def by_method_line(summary: dict) -> str | None:
    """The summary's line on which passes are not SLUG's, when a fallback made a patch (None otherwise)."""
    if not set(summary.get("by_method") or {}) - {"slug"}:
        return None
    return "by method: " + "; ".join(f"{m} {v['passed']} of {v['runs']} passed"
                                     for m, v in summary["by_method"].items())
