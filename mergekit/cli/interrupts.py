"""Ctrl-C (SIGINT) and SIGTERM over a command's whole life, from the import of ``mergekit.cli``
to the exit: until the command's outcome is decided, a signal ends the process with exit 130
or 143 and one line on stderr (``error: interrupted; ...``), never a traceback, a silent exit
or an "Exception ignored" report. Three phases, one set of handlers each:

- start-up (imports, option parsing), from ``take_signals``: nothing has been written, so the
  handler ends the process at once, wherever the interpreter is (also inside an import or a
  finalizer, where an exception would be reported as a crash, or dropped);
- the command's work, inside ``guarded``: the handler raises ``KeyboardInterrupt``
  (``Terminated`` for SIGTERM) in the main thread, so a merge stops cleanly and keeps its
  finished shards, and ``guarded`` reports it. One raised inside a finalizer, where Python
  would print "Exception ignored" and drop it, is raised again;
- once the work is done and reported: the signals are ignored. The exit code and message
  say what happened; the process ends within milliseconds.

The interpreter's own start-up, before it imports ``mergekit.cli`` (about 20 ms, more with
many ``.pth`` files), is not covered: a signal then ends Python as it ends any program.

stdlib only: this runs before the command's imports (typer alone takes 30 ms).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTHING_WRITTEN = "nothing was written to the output folder"
START_AGAIN = "rerun the same command to start again"
RAISE_AGAIN_S = 0.005  # see _raise_again

Handler = Callable[[int, FrameType | None], Any] | int | None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the merge stops as cleanly as on Ctrl-C."""


def exit_code(exc: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def stopped(exc: KeyboardInterrupt) -> str:
    """What stopped the command, for the error line."""
    return "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"


def signal_cause(exc: BaseException) -> KeyboardInterrupt | None:
    """The signal's exception that ``exc`` was raised from, if any: Python wraps one raised
    in some hooks (``__set_name__`` on 3.11, where pydantic builds a model class) in a
    RuntimeError."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, KeyboardInterrupt):
        cause = cause.__cause__
    return cause


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stop_now(signum: int, frame: FrameType | None) -> None:
    """Start-up: end the process here, after what it printed so far."""
    exc = _exception(signum)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream, or the one being written
            stream.flush()
    line = f"error: {stopped(exc)}; {NOTHING_WRITTEN}; {START_AGAIN}\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    os._exit(exit_code(exc))


def _raise(signum: int, frame: FrameType | None) -> None:
    raise _exception(signum)


def _swap(handlers: Mapping[int, Handler]) -> None:
    """Install ``handlers`` with the signals blocked, so none arrives between two of them
    (where signals can be blocked: not on Windows)."""
    mask = getattr(signal, "pthread_sigmask", None)
    blocked = mask(signal.SIG_BLOCK, SIGNALS) if mask else None
    try:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    finally:
        if mask:
            mask(signal.SIG_SETMASK, blocked)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def take_signals() -> None:
    """Start-up: a signal ends the process at once with the one line. Called on the import
    of ``mergekit.cli``, the command-line programs' package. A signal the process was
    started with ignored (a background job of a shell script) stays ignored."""
    if not _in_main_thread():
        return
    _swap({s: _stop_now for s in SIGNALS if signal.getsignal(s) != signal.SIG_IGN})


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """The command's work: a signal raises in the main thread (see the module's notes).
    Afterwards, where the process is a mergekit command (the start-up handlers were in
    place), the signals are ignored; else (mergekit's CLI called inside another program)
    the handlers from before come back."""
    if not _in_main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in SIGNALS}
    after: dict[int, Handler] = {
        s: signal.SIG_IGN if h is _stop_now else h for s, h in before.items()}
    hook = sys.unraisablehook
    sys.unraisablehook = _raise_again(hook)
    try:
        _swap({s: _raise for s, h in before.items() if h != signal.SIG_IGN})
        yield
    finally:
        _swap(after)
        sys.unraisablehook = hook


def _raise_again(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """An unraisable-exception hook that, for a signal's exception dropped in a finalizer
    (or a weakref callback), sends the signal again a moment later instead of printing
    "Exception ignored"; other exceptions go to ``hook``."""

    def on_unraisable(args: Any) -> None:
        if isinstance(args.exc_value, KeyboardInterrupt):
            is_term = isinstance(args.exc_value, Terminated)
            # from another thread, once this hook has returned: a signal sent (or an
            # interrupt simulated) from here runs its handler inside the hook, which
            # drops the exception again
            again = threading.Timer(RAISE_AGAIN_S, _send,
                                    (signal.SIGTERM if is_term else signal.SIGINT,))
            again.daemon = True
            again.start()
        else:
            hook(args)

    return on_unraisable


def _send(signum: int) -> None:
    """``signum`` to the main thread; a real signal, where there is one, wakes it from a
    blocking call."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]
    else:
        _thread.interrupt_main(signum)
