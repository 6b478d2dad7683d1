"""The allocator settings make freed chunk-sized blocks reusable without new page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, resource, sys
from mergekit.allocator import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 * 1024 * 1024
faults = []
for _ in range(4):  # a chunk's inputs, temporaries and output: allocate, touch, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(6)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, min(faults[1:]))
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 6 * 8 * 1024 * 1024 // 4096
    tuned, tuned_faults = probe("tuned")
    assert tuned == "True"
    assert tuned_faults < pages // 10
    # the default settings give the block back and fault it in again: the setting matters
    _, default_faults = probe("default")
    assert default_faults > pages // 2
