"""The CLI edge: logging set-up and turning errors into one paragraph and an exit code."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer

from mergekit.cli import interrupts
from mergekit.errors import MergeError
from mergekit.printable import printable

T = TypeVar("T")


class _PrintableFormatter(logging.Formatter):
    """Each log message on one line, with the control characters of tensor names and paths
    from the inputs escaped (tracebacks appended after it keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))


def command_app() -> typer.Typer:
    """A typer app for one command. Help is click's plain layout: rich's option table
    squeezed each description into a third of an 80-column terminal; plain text wraps them
    beside the flags, or below a flag too long to share the line."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None,
                       context_settings={"help_option_names": ["-h", "--help"]})


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("mergekit")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def guarded(fn: Callable[[], T], verbose: bool) -> T:
    """Run ``fn``; a MergeError becomes ``error: ...`` on stderr and its exit code, and
    Ctrl-C or SIGTERM exit 130 or 143 (``interrupts``). Notes on the exception (how to
    resume) follow the error line."""
    try:
        # the handlers change back before the report: a signal then does not cut it short
        with interrupts.raising():
            return fn()
    except MergeError as exc:
        if verbose:
            _traceback(exc)
        _report(str(exc), exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        _interrupted(exc, exc)
    except BrokenPipeError:  # the reader went away (`mergekit-methods | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except Exception as exc:  # noqa: BLE001 - the edge reports every failure
        if (stop := interrupts.signal_cause(exc)) is not None:
            _interrupted(stop, exc)
        if verbose:
            _traceback(exc)
        _report(f"{type(exc).__name__}: {exc}; run again with -v for the traceback", exc)
        raise typer.Exit(1) from None


def _interrupted(stop: KeyboardInterrupt, exc: BaseException) -> NoReturn:
    """Report the interruption by ``stop`` (``exc``: what reached the edge, with the notes
    that say how to resume)."""
    what = f"{interrupts.stopped(stop)}; {interrupts.NOTHING_WRITTEN}"
    # Python 3.12+ notes where it was raised ("Error calling __set_name__ ..."): not ours
    notes = [n for n in getattr(exc, "__notes__", ()) if not str(n).startswith("Error calling")]
    exc.__notes__ = notes
    _report(what if notes else f"{what}; {interrupts.START_AGAIN}", exc)
    raise typer.Exit(interrupts.exit_code(stop)) from None


def run_app(app: Callable[[], object]) -> NoReturn:
    """Run a typer app as a console script, then end the process without the interpreter's
    teardown: once torch is loaded, unloading it takes noticeable time and achieves nothing.
    Every file the command wrote is closed by then; only the standard streams need flushing."""
    try:
        app()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(printable(str(exc.code)), file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to save
            pass
    os._exit(code)


def _report(message: str, exc: BaseException) -> None:
    """The error line and its notes, each one line: messages quote tensor names and paths
    from the inputs, whose control characters and line breaks are shown escaped."""
    print(f"error: {printable(message)}", file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):
        print(printable(str(note)), file=sys.stderr)


def _traceback(exc: BaseException) -> None:
    """``exc``'s traceback (for -v), its messages escaped as ``_report`` escapes them. The
    parts Python writes itself (stack frames, the lines between chained exceptions) keep
    their line breaks."""
    for part in traceback.TracebackException.from_exception(exc).format():
        if part.startswith(_TRACEBACK_OWN):
            print(printable(part, keep="\n"), end="", file=sys.stderr)
        else:
            print(printable(part.removesuffix("\n")), file=sys.stderr)


_TRACEBACK_OWN = ("Traceback ", "  File ", "  [Previous line", "\n")
