"""Read-ahead of a merge's inputs: a thread asks the system to read the inputs of the
coming tensor jobs into the page cache while the current one is merged."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mergekit.io.model import ModelSource


class TensorRead(Protocol):
    """A tensor a job reads: its model (a key of ``sources``) and its name there."""

    @property
    def model(self) -> str: ...

    @property
    def name(self) -> str: ...


class JobReads(Protocol):
    """What the readahead needs of a job (a plan's ``TensorJob``): the tensors it reads."""

    @property
    def inputs(self) -> tuple[TensorRead, ...]: ...

    @property
    def base(self) -> TensorRead | None: ...


class Readahead:
    """Has the inputs of the coming jobs read into the page cache by a thread of its own,
    up to ``READAHEAD_BYTES`` ahead of the job being merged: with inputs not yet in memory,
    the disk works while torch loads and while each tensor is merged, instead of waiting
    for the merge's page faults."""

    READAHEAD_BYTES = 1024**3

    def __init__(self, jobs: Sequence[JobReads], sources: Mapping[str, ModelSource]) -> None:
        self._jobs = jobs  # in the order they run
        self._sources = sources
        self._current = -1  # the job being merged
        self._advised = 0  # jobs whose inputs were handed to the thread
        self._ahead = 0  # input bytes handed over, of the jobs after the current one
        self._todo: queue.SimpleQueue[TensorRead | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._prefetch_all, name="readahead",
                                        daemon=True)

    def __enter__(self) -> Readahead:
        self._thread.start()
        self._fill()
        return self

    def __exit__(self, *exc: object) -> None:
        self._todo.put(None)
        self._thread.join()

    def _prefetch_all(self) -> None:
        while (ref := self._todo.get()) is not None:
            try:
                self._sources[ref.model].prefetch(ref.name)
            except Exception:  # noqa: BLE001 - a hint only; the merge's own read reports it
                pass

    def _refs(self, job: JobReads) -> tuple[TensorRead, ...]:
        return job.inputs + ((job.base,) if job.base else ())

    def _nbytes(self, job: JobReads) -> int:
        return sum(self._sources[r.model].info(r.name).nbytes for r in self._refs(job))

    def _fill(self) -> None:
        while self._advised < len(self._jobs) and (
                self._advised <= self._current or self._ahead < self.READAHEAD_BYTES):
            job = self._jobs[self._advised]
            for ref in self._refs(job):
                self._todo.put(ref)
            if self._advised > self._current:
                self._ahead += self._nbytes(job)
            self._advised += 1

    def next_job(self) -> None:
        """Call as each job begins."""
        self._current += 1
        if self._current < self._advised:
            self._ahead -= self._nbytes(self._jobs[self._current])
        self._fill()
