"""The run's readahead: every input of the jobs is handed to the system in job order, and
no more than READAHEAD_BYTES ahead of the job being merged."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from mergekit.io.readahead import Readahead
from mergekit.plan import TensorJob, TensorRef

MB = 1024 * 1024


class FakeSource:
    """Tensors of a given size; records the names prefetched (on the readahead thread)."""

    def __init__(self, sizes: dict[str, int], log: list[str], lock: threading.Lock) -> None:
        self.sizes, self.log, self.lock = sizes, log, lock

    def info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(nbytes=self.sizes[name])

    def prefetch(self, name: str) -> None:
        with self.lock:
            self.log.append(name)


def job(i: int) -> TensorJob:
    return TensorJob(f"out{i}", "linear", (TensorRef("a", f"t{i}"),), TensorRef("b", f"t{i}"),
                     {}, (1,), "F32", 0, None)


def test_inputs_are_prefetched_in_order_within_the_budget(monkeypatch):
    monkeypatch.setattr(Readahead, "READAHEAD_BYTES", 100 * MB)
    log: list[str] = []
    lock = threading.Lock()
    sizes = {f"t{i}": 30 * MB for i in range(6)}  # 60 MB of input per job (two models)
    sources = {"a": FakeSource(sizes, log, lock), "b": FakeSource(sizes, log, lock)}
    jobs = [job(i) for i in range(6)]
    seen_at_start: list[int] = []
    with Readahead(jobs, sources) as readahead:
        for _ in jobs:
            readahead.next_job()
            # handed over: this job and the next ones until 100 MB past it are asked for
            seen_at_start.append(readahead._advised)
    assert seen_at_start == [3, 4, 5, 6, 6, 6]
    # the thread prefetched every input of every job once, base and model, in job order
    assert log == [name for i in range(6) for name in (f"t{i}", f"t{i}")]
