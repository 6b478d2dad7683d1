"""Process-wide settings for a merge run from the command line: the memory allocator,
torch's idle worker threads and the garbage collector. Only the CLI applies them; a program
that imports mergekit keeps its own settings.

A merge allocates and frees the same few-megabyte buffers (row chunks) thousands of times.
glibc serves blocks that large with fresh ``mmap`` calls and unmaps them on free, so every
chunk's memory is faulted in page by page again: as much time as the elementwise math
itself. Raising the mmap and trim thresholds makes freed chunks reusable at
once. Peak memory is unchanged: the blocks reused are the ones the merge needed anyway.

torch's OpenMP workers spin for a while after each parallel operation, waiting for the next
one. A merge runs a writer thread (hashing and writing the output) beside the math, on
machines with few cores: spinning workers take its core and slow most merges down.
Sleeping workers wake fast enough for chunk-sized operations.

numpy (which torch imports) brings OpenBLAS, whose thread pool starts at import and spins
for a while although a merge never calls it (torch's own math uses MKL here), taking CPU
time from torch's import.

Python's cyclic garbage collector is turned off: refcounting frees a merge's tensors and
buffers, and a whole merge leaves under a hundred objects in reference cycles whatever the
model size (a test holds it to that), while the collections that torch's few hundred
thousand long-lived objects set off re-traverse them all, even right after torch's import
(which itself runs with the collector paused).

The figures behind each setting: benchmarks/README.md.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap; larger ones (whole tensors of big models) are
# still mapped and unmapped on their own.
MMAP_THRESHOLD_BYTES = 256 * 1024**2
# Free memory at the top of the heap above this is returned to the system.
TRIM_THRESHOLD_BYTES = 1024**3


def tune_allocator() -> bool:
    """Apply the settings where the C library is glibc; returns whether it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


# Set unless the user set them; read once, when torch (and numpy) first load.
THREAD_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


def tune_threads() -> None:
    """Idle OpenMP workers sleep instead of spinning and numpy's unused OpenBLAS starts no
    threads, unless the user chose otherwise. Takes effect only when called before torch is
    first imported."""
    for name, value in THREAD_SETTINGS.items():
        os.environ.setdefault(name, value)


def tune_gc() -> None:
    """No cyclic garbage collection for the rest of the process (see the module's notes)."""
    gc.disable()


def tune_process() -> None:
    tune_threads()
    tune_allocator()
    tune_gc()
