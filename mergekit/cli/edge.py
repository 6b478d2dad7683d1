"""The CLI edge: logging set-up and turning errors into one paragraph and an exit code."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import typer

from mergekit.errors import MergeError

T = TypeVar("T")


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("mergekit")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def guarded(fn: Callable[[], T], verbose: bool) -> T:
    """Run ``fn``; a MergeError becomes ``error: ...`` on stderr and its exit code."""
    try:
        return fn()
    except MergeError as exc:
        if verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output folder", file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the edge reports every failure
        if verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}; run again with -v for the traceback",
              file=sys.stderr)
        raise typer.Exit(1) from None
