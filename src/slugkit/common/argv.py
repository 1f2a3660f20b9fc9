"""Checks of a command line that argparse does not make (shared by ``slug`` and the trainers' own parsers)."""

from __future__ import annotations

import argparse
import os

__all__ = ["SlugParser", "given_twice"]


def given_twice(sub: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """An option that takes one value given more than once (``--out A --out B``, ``export --lora A --lora B``):
    argparse silently kept the last (fifteenth trial). A repeatable option (``--patch``, ``--identity-template``)
    given the same value twice (the same path, however spelled) is refused too: ``revert --patch P --patch P``
    failed on the second copy's hash with a message about the weights. Flags are not counted. ``sub``: the
    command's own parser (``slug world train-t2i`` and ``train-canvas`` have theirs, and were not checked:
    sixteenth-trial review). Returns the refusal, or None."""
    single = {o: act for act in sub._actions if isinstance(act, argparse._StoreAction) for o in act.option_strings}
    many = {o: act for act in sub._actions if isinstance(act, argparse._AppendAction) for o in act.option_strings}
    every = [o for act in sub._actions for o in act.option_strings]
    seen: dict = {}
    values: dict = {}
    for i, word in enumerate(argv):
        if word == "--":
            break
        flag, _, inline = word.partition("=")
        if flag.startswith("--") and flag not in every:  # an abbreviation argparse accepts: `--ou x2`
            whole = [o for o in every if o.startswith(flag)]
            flag = whole[0] if len(whole) == 1 else flag
        act = single.get(flag) or many.get(flag)
        if act is None:
            continue
        value = inline if inline or "=" in word else (argv[i + 1] if i + 1 < len(argv) else "")
        if act is many.get(flag):
            key = os.path.realpath(value) if value and os.path.exists(value) else value
            if key in values.setdefault(act.dest, set()):
                return f"{flag} is given the same value twice ({value!r}); give each once"
            values[act.dest].add(key)
            continue
        if act.dest in seen:
            return f"{flag} is given twice ({seen[act.dest]!r}, then {value!r}); give it once"
        seen[act.dest] = value
    return None


class SlugParser(argparse.ArgumentParser):
    """``error: <message>`` on one line (no usage block), exit status 2, with a pointer to ``--help`` and, for an
    unknown option, the nearest one (``slug`` and the trainers' own parsers: ``world train-t2i --chanels 8`` printed
    argparse's usage block with neither; twenty-first trial)."""

    def parse_known_args(self, args=None, namespace=None):
        self._words = list(args) if args is not None else None  # for error(): a typo before a missing option
        return super().parse_known_args(args, namespace)

    def _unknown_options(self) -> list[str]:
        """The ``--words`` of this parse that name none of this parser's options (nor abbreviate one)."""
        flags = [o for x in self._actions for o in x.option_strings]
        out = []
        for w in getattr(self, "_words", None) or []:
            if w == "--":
                break
            w = w.split("=")[0]
            if w.startswith("--") and w not in flags and sum(f.startswith(w) for f in flags) != 1:
                out.append(w)
        return out

    def error(self, message):
        near = []
        unknown = self._unknown_options() if message.startswith("the following arguments are required") else []
        if unknown:  # `export --patchh P` said only "required: --lora, --pipeline, --out" (the typo unnamed)
            message = f"unrecognized arguments: {' '.join(unknown)}"
        if message.startswith("unrecognized arguments:"):
            import difflib

            flags = [o for x in self._actions for o in x.option_strings if o.startswith("--") and o != "--help"]
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
            near = next((m for m in (difflib.get_close_matches(w, flags, 1) for w in words) if m), [])
        self.exit(2, f"error: {message}" + (f" (did you mean {near[0]}?)" if near else "")
                  + f" (see `{self.prog} --help`)\n")


def seed(text: str) -> int:
    """argparse type of every ``--seed`` (the CLI's, the trainers', the benchmarks'): an integer in [0, 2^63 − 1].
    numpy refuses a negative seed and torch an overflowing one, after minutes of work and naming no option (`slug
    canvas lite --seed -5`, trial 51; `slug world train-canvas --seed 2^64`, verification 52)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63 - 1], got {v}")
    return v
