"""The ``slug`` program (the console script; also ``python -m slugkit``).

Ctrl-C handling (:mod:`slugkit.common.interrupts`: never inside an import) is installed before the command line
interface and its libraries are imported, so a Ctrl-C in the first tenth of a second is ``interrupted`` (exit 130)
like any other, not a traceback from the middle of an import. Once the command has returned, Ctrl-C and SIGTERM
are ignored while the interpreter shuts down, so that the exit status is the command's.
"""

from __future__ import annotations

import sys

from .common import interrupts


def main() -> int:
    """Run ``slug`` with ``sys.argv``; returns the exit status (see :func:`slugkit.cli.main`)."""
    with interrupts.handling():
        try:
            from .cli import main as cli_main

            rc = cli_main()
        except KeyboardInterrupt as e:  # while importing the CLI, or after its own handling (a late Ctrl-C)
            terminated = isinstance(e, interrupts.Terminated)
            print("terminated" if terminated else "interrupted", file=sys.stderr)
            rc = 143 if terminated else 130
    interrupts.ignore_while_exiting()  # the command has ended and said so: its exit status is rc, not the signal's
    return rc


if __name__ == "__main__":
    sys.exit(main())
