"""Named fault-injection points, for the tests of stopped merges.

A test starts a merge with ``MERGEKIT_FAILPOINT=<name>`` (e.g. ``shard-done:1``) in its
environment; the process stops itself with SIGSTOP on reaching that point, and the test
then kills, interrupts or resumes it from outside. The points:

- ``shard-start:N``: before shard N's first tensor is merged;
- ``tensor:N``: after the N-th tensor this run merged is handed to the writer;
- ``shard-done:N``: after shard N is complete on disk and in the journal;
- ``before-move``: with every file written, before the output is moved into place.

Unset, a point costs one comparison: the variable is read once, at import."""

from __future__ import annotations

import os
import signal

VARIABLE = "MERGEKIT_FAILPOINT"
_ARMED = os.environ.get(VARIABLE)


def failpoint(name: str, number: int | None = None) -> None:
    """Stop this process here when the environment names this point (``name`` or, with a
    ``number``, ``name:number``)."""
    if _ARMED is not None and _ARMED == (name if number is None else f"{name}:{number}"):
        os.kill(os.getpid(), signal.SIGSTOP)
