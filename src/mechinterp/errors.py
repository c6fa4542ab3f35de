"""The one exception type for problems a user can fix (bad config, missing or corrupt input), and
how a stage's command-line entry point reports it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""


def rebuild_hint(*paths: str | Path) -> str:
    """How to rebuild broken outputs: delete them, then the same command again. Every stage output is
    an input of the manifest, so a plain rerun rebuilds whatever is missing and what depends on it."""
    return ("Fix: delete what is broken and rerun the same snakemake command (a plain rerun rebuilds whatever "
            f"is missing): rm -r {' '.join(str(p) for p in paths)}")


def exit_status(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main(argv)` and return its exit status: a UserError is printed as `error: ...`
    (no traceback: the message says what to fix) and gives 2."""
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_stage(main: Callable[[list[str] | None], int | None]) -> None:
    """Run a stage's `main` as a program (`python -m mechinterp.<stage>`), logging to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(exit_status(main))
