"""``slug``: the command-line entry point.

    slug demo [--concept NAME] [--out DIR]           SLUG on the embedded world (no downloads)
    slug unlearn --model M --concept C --forget ... --out DIR
    slug curate --shards SPEC --concept NAME --out DIR
    slug grads --model M --forget SPEC --retain SPEC --out G.safetensors   (also under torchrun)
    slug compare [--concept NAME] [--methods slug,ft,ga,gaft,salun,ssd] --out DIR
    slug apply / revert / inspect                    patches
    slug export --lora PATCH --pipeline DIR --out F  a text-encoder patch as a diffusers LoRA file
    slug audit --patch RUN|PATCH [--out DIR]          does the removal hold? (prompts, attack, precision, ...)
    slug world names | train | data                  the embedded synthetic world

Each command group lives in its own module (``run``: demo, unlearn; ``compare``; ``data``: curate, grads;
``patches``: apply, revert, inspect, export; ``evalsd``: eval-sd; ``audit``; ``world``), which adds its subparsers;
``args`` holds the shared argument groups and the argument checks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..common import interrupts
from ..common.errors import check_device, device_error_hint
from ..common.interrupts import Terminated
from . import audit, canvas, compare, data, patches, run, world

__all__ = ["build_parser", "check_device", "device_error_hint", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``slug`` argument parser, with every command's subparser (in the order `slug --help` lists them)."""
    from .. import __version__
    from .args import SlugParser

    p = SlugParser(prog="slug", description="Targeted unlearning with SLUG: edit one layer once. Exit status: 0 pass, "
                                            "2 a usage or input error, or a refusal (no layer and step met the "
                                            "criteria: no patch written), 3 unlearned with warnings, 4 not unlearned "
                                            "(or nothing to unlearn, or the model broken), 130 interrupted, 141 "
                                            "stdout closed early, 143 terminated.")
    p.add_argument("--version", action="version", version=f"slugkit {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    run.add_parsers(sub)  # demo, unlearn
    compare.add_parsers(sub)  # compare
    data.add_parsers(sub)  # curate, grads
    patches.add_parsers(sub)  # apply, revert, eval-sd (cli.evalsd), inspect, export
    audit.add_parsers(sub)  # audit
    world.add_parsers(sub)  # world names | train | data | train-t2i | train-canvas
    canvas.add_parsers(sub)  # canvas lite
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``slug ARGS``; returns the exit status.

    0 success (verdict ``pass``); 3 the run finished with verdict ``warn``; 4 verdict ``fail`` (not unlearned, or
    nothing to unlearn); 2 a user error, printed as one line ``error: ...`` (an OS error as ``error: <path>:
    <reason>``), with nothing left behind; 130 interrupted (Ctrl-C: ``interrupted`` on stderr, the run's temporary
    folder removed); 141 stdout closed early (``slug inspect P | head -1``: the rest of the output is dropped quietly,
    as a program killed by SIGPIPE); 143 terminated (SIGTERM — ``kill``, a scheduler cancelling the job — unwinds
    like Ctrl-C when ``slug`` is the program, ``argv`` None: ``terminated`` on stderr, the run's temporary folder
    and curated inputs removed). A claim on an output folder that the command left unfinished is undone on the way
    out."""
    from ..common.progress import plain_progress_if_not_a_tty
    from ..common.runfolder import abandon_claims

    plain_progress_if_not_a_tty()
    try:
        # only as the program (`slug`, `python -m slugkit.cli`: argv None), in its main thread: a caller that runs
        # main in-process with its own argv keeps its own signal handling
        with interrupts.handling(argv is None):
            try:
                rc = _dispatch(argv)
            finally:
                abandon_claims()
        if sys.stdout is not None:  # None: started with stdout closed (`slug demo >&-`); print() drops the output
            sys.stdout.flush()  # a closed pipe shows here, while we can still handle it
        return rc
    except BrokenPipeError:
        # Python docs, "Note on SIGPIPE": point stdout at devnull so the flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as e:
        return _stopped(e)
    except Exception as e:  # Ctrl-C during a lazy import surfaces wrapped (e.g. diffusers' "Failed to import ...")
        cause = _interrupted(e)
        if cause is not None:
            return _stopped(cause)
        raise


def _stopped(e: KeyboardInterrupt) -> int:
    terminated = isinstance(e, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    return 143 if terminated else 130


def _interrupted(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or :class:`Terminated`) that caused ``e`` (directly or down its
    ``__cause__``/``__context__`` chain), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _cli_words(text: str) -> str:
    """A config's check in the CLI's words: ``UnlearnConfig.clip_skip (--clip-skip): …`` → ``--clip-skip: …`` (the
    Python API names the field and its option; a shell user knows only the option)."""
    text = text.replace("--overwrite (overwrite=True)", "--overwrite")  # a message shared with the Python API
    return re.sub(r"^(?:(?:UnlearnConfig|SearchConfig|Budgets|CompareConfig)\.)?[a-z_]+ \((--[\w-]+)\)(?=[: ])", r"\1",
                  text)  # also a function's argument: `path (--out) x is inside the run folder …` → `--out x …`


def _dispatch(argv: list[str] | None) -> int:
    """Parse, check --device, run the command; user errors print `error: ...` and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["world", "train-t2i"]:  # its own argparse (python -m slugkit.world.t2i_train)
        from ..world.t2i_train import main as t2i_main

        return t2i_main(argv[2:])
    if argv[:2] == ["world", "train-canvas"]:  # its own argparse (python -m slugkit.world.canvas_train)
        from ..world.canvas_train import main as canvas_main

        return canvas_main(argv[2:])
    parser = build_parser()
    sub = _command_parser(parser, argv)
    subs = [x for x in sub._actions if isinstance(x, argparse._SubParsersAction)]
    if subs and not {"-h", "--help", "--version"} & set(argv):  # `slug`, `slug world`: "required: cmd"
        later = next((w for w in argv if w in subs[0].choices), None)
        depth = len(sub.prog.split()) - 1  # the words naming `sub` (`slug world`: 1)
        if later is not None and argv[depth:] and argv[depth].startswith("-"):  # "needs a command" (trial 39)
            print(f"{sub.format_usage().rstrip()}\nerror: {argv[depth]} is an option of the command, not of "
                  f"{sub.prog}: put it after the command ({sub.prog} {later} {argv[depth]} …)", file=sys.stderr)
            return 2
        print(f"{sub.format_usage().rstrip()}\nerror: {sub.prog} needs a command: {', '.join(subs[0].choices)} "
              f"(`{sub.prog} --help` says what each does)", file=sys.stderr)
        return 2
    a, extra = parser.parse_known_args(argv)
    if extra:  # argparse's own error named the top-level `slug --help` (twentieth trial): the command's parser says
        sub.error(f"unrecognized arguments: {' '.join(extra)}")  # it, with the nearest option (SlugParser)
    from ..common.errors import EmptyForgetSetError, ModelLoadError, OutputExistsError, ShardError
    from ..common.runfolder import RunLockedError
    from ..patch import PatchError
    from ..common.text import printable
    from ..slug.gradients import NonFiniteGradientError
    from ..slug.search import SearchFailed

    msg = check_device(getattr(a, "device", None))
    out = getattr(a, "out", None)
    if isinstance(out, str) and not out.strip():  # every command: '' is not "the default folder" nor "here"
        msg = ("--out is empty (an unset shell variable?); name where to write, or leave the option out where it has "
               "a default")
    # demo, unlearn, compare: --concept beside --concepts was dropped silently (ninth and eighteenth trials)
    if getattr(a, "concept", None) is not None and getattr(a, "concepts", None):
        msg = f"--concept {a.concept!r} and --concepts {a.concepts!r} exclude each other: use --concepts"
    msg = msg or _empty_value(parser, argv, a) or _given_twice(parser, argv)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    threads, cores = getattr(a, "threads", None), os.cpu_count() or 1
    if isinstance(threads, int) and threads > cores:  # `--threads 999` on 2 cores crawled without a word
        print(f"warning: --threads {threads} is more than the {cores} CPU cores here; torch slows down past the core "
              "count", file=sys.stderr)
    if getattr(a, "no_progress", False):  # transformers' and the hub's bars too ("Loading weights": trial 26); read
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # when transformers is first imported, and by the hub
        for lib in ("transformers", "diffusers"):  # imported already; else the variable above is read
            if lib in sys.modules:
                sys.modules[lib].utils.logging.disable_progress_bar()
    try:
        _settle_inputs(a)
        return a.func(a)
    except BrokenPipeError:
        raise
    except (EmptyForgetSetError, ShardError, ModelLoadError, PatchError, SearchFailed, OutputExistsError,
            RunLockedError, ValueError, NonFiniteGradientError) as e:
        text = refusal_text(str(e)) if isinstance(e, SearchFailed) else _cli_words(printable(e))
        print(f"error: {text}", file=sys.stderr)
        return getattr(e, "exit_status", 2)  # NothingToUnlearnError: 4, like a failed verdict
    except OSError as e:  # a missing or existing path, a full disk, a read-only filesystem, a folder for a file ...
        print(f"error: {_cli_words(printable(os_error_text(e)))}", file=sys.stderr)  # a newline split the line
        return 2
    except RuntimeError as e:
        if str(e).startswith("Symlink loop from "):  # pathlib's resolve() on `ln -s a b; ln -s b a`
            where = printable(str(e).removeprefix("Symlink loop from ").strip("'"))
            print(f"error: {where}: is a loop of symbolic links; name a real folder or file", file=sys.stderr)
            return 2
        hint = device_error_hint(e)
        if hint is None:  # not a device problem: a bug, keep the traceback
            raise
        print(f"error: {e}\n{hint}", file=sys.stderr)
        return 2


def _empty_value(parser: argparse.ArgumentParser, argv: list[str], a) -> str | None:
    """``--checkpoint ""``, ``--shards ""``, ``inspect ""`` (an unset shell variable): named, instead of the option
    being taken as absent (``needs --model M``) or as the current folder (``.: not a pipeline folder``)."""
    sub = _command_parser(parser, argv)
    for action in sub._actions:
        value = getattr(a, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            if not action.option_strings:
                return f"the {action.dest} argument is empty (an unset shell variable?); give a value"
            flag = action.option_strings[-1]
            return f"{flag} is empty (an unset shell variable?); give a value" + (
                "" if action.required else ", or leave the option out")  # `export --lora ""`: it is required
    return None


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the command ``argv`` names (``slug world data``: two levels down)."""
    sub = parser
    for word in argv:
        actions = [x for x in sub._actions if isinstance(x, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        sub = actions[0].choices[word]
    return sub


def _given_twice(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """:func:`slugkit.common.argv.given_twice` on the parser of the command ``argv`` names."""
    from ..common.argv import given_twice

    return given_twice(_command_parser(parser, argv), argv)


def _settle_inputs(a) -> None:
    """The patch and run folders the command reads (``--patch``, ``inspect PATCH``, ``export --lora``): refused while
    a slug run writes them, repaired when one died writing them (:func:`slugkit.common.runfolder.settle`)."""
    from ..common.runfolder import settle

    for name in ("patch", "lora"):
        given = getattr(a, name, None)
        for path in ([given] if isinstance(given, str) else given if isinstance(given, list) else []):
            if isinstance(path, str) and path.strip():
                settle(path)


def refusal_text(msg: str) -> str:
    """A refusal (:class:`~slugkit.slug.search.SearchFailed`) as the terminal shows it: its clauses — what no layer
    met; ``no second layer: …``; ``closest: …``; ``try …`` — on indented lines instead of one line of ~900
    characters. Splits only outside parentheses, but for a multi-layer refusal's rounds (each round's refusal, its
    clauses indented below it); the message itself (result JSON, benchmark rows) stays one line."""
    rounds = re.match(r"(\d+ rounds of layer edits did not forget within the budgets) \(round 1: (.*)\) \(no patch\)$",
                      msg, re.S)
    k = rounds.group(2).rfind("; round ") if rounds else -1
    if k > 0:  # each round's refusal on its own lines, its clauses below it (one line of ~1500 characters: trial 26)
        label, _, last = rounds.group(2)[k + 2:].partition(": ")
        return "\n  ".join([f"{rounds.group(1)} (no patch)",
                             *(f"{n}: " + refusal_text(t).replace("\n  ", "\n      ")
                               for n, t in (("round 1", rounds.group(2)[:k]), (label, last)))])
    opener = " (no second layer: "
    lines, cur, depth, group, i = [], "", 0, False, 0
    while i < len(msg):
        if depth == 0 and msg.startswith("; ", i):
            lines, cur, i = lines + [cur], "", i + 2
        elif depth == 0 and msg.startswith(opener, i):
            lines, cur, i, depth, group = lines + [cur], "no second layer: ", i + len(opener), 1, True
        else:
            depth += {"(": 1, ")": -1}.get(msg[i], 0)
            if group and depth == 0:  # the group's own ")" is dropped: its clause is a line now
                lines, cur, group = lines + [cur], "", False
            else:
                cur += msg[i]
            i += 1
    lines = [x.strip() for x in lines + [cur] if x.strip()]
    return "\n  ".join(lines)


def os_error_text(e: OSError) -> str:
    """``<path>: <reason>`` for an OSError that names a path (``<path> -> <path2>: <reason>`` for two), else its
    message."""
    from ..common.files import final_path  # a path in a run's temporary folder is named as OUT's

    if e.filename is None or e.strerror is None:
        return str(e)
    where = final_path(os.fsdecode(e.filename)) + (f" -> {final_path(os.fsdecode(e.filename2))}"
                                                   if e.filename2 is not None else "")
    return f"{where}: {e.strerror}"
