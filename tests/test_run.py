"""backends.py: torch is imported with the garbage collector paused, and its state restored; a
merge leaves a fixed few objects in reference cycles, whatever its size."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from conftest import env_without_coverage

# In a fresh interpreter (torch not yet imported): count the collections that happen while
# import_torch runs, then report whether the collector is enabled again.
PROBE = """
import gc, sys
enabled_before = sys.argv[1] == "on"
if not enabled_before:
    gc.disable()
import mergekit.backends as backends
assert "torch" not in sys.modules
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info))
torch = backends.import_torch()
gc.callbacks.clear()
print(len(collections), gc.isenabled(), torch.__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("state", ["on", "off"])
def test_torch_is_imported_without_collections_and_the_collector_is_restored(state):
    # not under coverage: its tracer's own allocations, once the collector is back on,
    # would set off a collection
    proc = subprocess.run([sys.executable, "-c", PROBE, state], capture_output=True,
                          text=True, timeout=120, env=env_without_coverage())
    assert proc.returncode == 0, proc.stderr
    count, enabled, name = proc.stdout.split()
    assert count == "0"  # importing torch otherwise runs hundreds of collections
    assert enabled == str(state == "on")
    assert name == "torch"


@pytest.mark.slow
def test_importing_torch_normally_does_collect():
    """The control for the test above: the plain import does trigger collections."""
    probe = ("import gc; n = []; gc.callbacks.append(lambda p, i: p == 'start' and n.append(1))"
             "\nimport torch\nprint(len(n))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 0


def cyclic_garbage(do_merge) -> int:
    """Objects left in reference cycles by one merge (what refcounting cannot free)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        do_merge()
        return gc.collect()
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_cyclic_garbage_does_not_grow_with_the_merge(engine, merge, llama_models, monkeypatch,
                                                     small_chunks):
    """The CLI turns the cyclic collector off, which is safe only while a merge's cycles
    are a fixed few: 1 layer in one chunk per tensor and 4 layers in many chunks per
    tensor must leave the same number, on either engine."""
    from collections import Counter

    import mergekit.run as run
    from mergekit.io.model import ModelSource

    if engine == "torch":
        monkeypatch.setattr(run, "NUMPY_ENGINE", False)

    def linear(layers: int) -> dict:
        return {"merge_method": "linear", "slices": [{"sources": [
            {"model": str(m), "layer_range": [0, layers], "parameters": {"weight": 0.5}}
            for m in llama_models[:2]]}]}

    chunk_reads: Counter = Counter()  # row-chunk reads, by tensor
    for read in ("read", "read_array"):
        real = getattr(ModelSource, read)

        def counting(self, name, rows=None, real=real):
            if rows is not None:
                chunk_reads[name] += 1
            return real(self, name, rows)

        monkeypatch.setattr(ModelSource, read, counting)
    merge(linear(1))  # one-off imports and caches
    small = cyclic_garbage(lambda: merge(linear(1)))
    assert not chunk_reads
    small_chunks(64)
    large = cyclic_garbage(lambda: merge(linear(4)))
    # (64, 16) embeddings: 16 chunks of each of 2 models; 4 of each (16, 16) projection
    assert chunk_reads["model.embed_tokens.weight"] == 32
    assert len(chunk_reads) == 2 + 7 * 4
    assert small == large
    assert small < 200
