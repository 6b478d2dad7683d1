"""Streaming safetensors output: each shard's header is known from the plan, so tensors
are written to disk as they are produced and no shard is ever held in memory."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mergekit.errors import merge_failure
from mergekit.io.dtypes import itemsize, st_code

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class ShardEntry:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def shard_header(entries: list[ShardEntry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors shard; tensors must arrive in ``entries`` order.

    Tensor bytes are written by a background thread, so the disk works while the next
    tensor is merged, and hashed by another (the sha256 costs as much CPU as the write);
    at most ``QUEUE_DEPTH`` chunks wait for each. A write error surfaces at the
    next ``add`` or at ``finish``. The bytes go to ``<name>.part``, renamed to ``path`` by
    ``finish`` once synced, so a file under the shard's name is always complete.
    """

    QUEUE_DEPTH = 4

    def __init__(self, path: Path, entries: list[ShardEntry]) -> None:
        self.path = path
        self.part_path = path.with_name(path.name + ".part")
        self._entries = entries
        self._next = 0
        self._written = 0  # bytes of the current entry accepted so far (row chunks)
        self._error: OSError | None = None
        self._hash = hashlib.sha256()
        try:
            self._file: BinaryIO = open(self.part_path, "wb")  # noqa: SIM115 - see abort()
        except OSError as exc:
            raise merge_failure(str(path), f"cannot create ({exc.strerror})",
                                "check the output folder's permissions and free space") from None
        header = shard_header(entries)
        self._header_bytes = len(header)
        self._hash.update(header)
        try:
            self._file.write(header)
        except OSError as exc:
            self._fail(exc)
        self._queue: queue.Queue[memoryview | None] = queue.Queue(self.QUEUE_DEPTH)
        self._hash_queue: queue.Queue[memoryview | None] = queue.Queue(self.QUEUE_DEPTH)
        self._hasher = threading.Thread(target=self._hash_all, name="shard-hasher", daemon=True)
        self._hasher.start()
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def _hash_all(self) -> None:
        while (data := self._hash_queue.get()) is not None:
            self._hash.update(data)

    def _drain(self) -> None:
        try:
            self._write_all()
        finally:
            self._hash_queue.put(None)

    def _write_all(self) -> None:
        written = self._header_bytes  # file offset of the next byte
        synced = 0  # the file's bytes before this offset are on their way to the disk
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._file.write(data)
                    self._hash_queue.put(data)
                    written += len(data)
                    if written - synced >= WRITEBACK_BYTES:
                        self._file.flush()
                        start_writeback(self._file.fileno(), synced, written - synced)
                        synced = written
                except OSError as exc:
                    self._error = exc

    def _fail(self, exc: OSError) -> None:
        self.abort()
        raise merge_failure(str(self.path), f"cannot write ({exc.strerror})",
                            "free disk space or choose another output folder") from None

    def add(self, name: str, tensor: torch.Tensor | np.ndarray, code: str | None = None) -> None:
        """Write the next tensor of the shard, or the next row chunk of it: a torch tensor,
        or a numpy array of the stored bytes of safetensors dtype ``code``."""
        import numpy as np

        if self._error is not None:
            self._fail(self._error)
        entry = self._entries[self._next]
        if isinstance(tensor, np.ndarray):
            data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        else:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(_u8()).numpy()
            code = st_code(tensor.dtype)
        ok_shape = tuple(tensor.shape) == entry.shape or (
            self._written + data.nbytes <= entry.nbytes and tuple(tensor.shape[1:]) ==
            entry.shape[1:])
        if name != entry.name or not ok_shape or code != entry.dtype:
            raise RuntimeError(
                f"internal: expected {entry.name} {entry.shape} {entry.dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}")
        if data.nbytes:
            self._queue.put(memoryview(data))  # the array stays alive through the view
        self._written += data.nbytes
        if self._written == entry.nbytes:
            self._next += 1
            self._written = 0

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._hasher.join()

    def finish(self) -> str:
        """Flush and sync the shard to disk and give it its name; returns its sha256 (hex)."""
        if self._next != len(self._entries):
            raise RuntimeError(f"internal: {self.path.name} got {self._next} of "
                               f"{len(self._entries)} tensors")
        self._stop()
        if self._error is not None:
            self._fail(self._error)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.part_path, self.path)
            sync_folder(self.path.parent)
        except OSError as exc:
            self._fail(exc)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Stop writing and delete the unfinished file."""
        if getattr(self, "_thread", None) is not None:
            self._error = self._error or OSError("aborted")
            self._stop()
        try:
            self._file.close()
        except OSError:
            pass
        self.part_path.unlink(missing_ok=True)


# The writer thread asks the kernel to start writing each this many bytes to the disk, so
# the disk works while the merge goes on and the fsync that completes a shard has only the
# last few megabytes left to wait for.
WRITEBACK_BYTES = 32 * 1024**2
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a byte range of ``fd`` to the disk without waiting (no-op where the
    system cannot; fsync later still makes it durable)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def sync_folder(folder: Path) -> None:
    """Make the renames and new files in ``folder`` durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _u8() -> torch.dtype:
    import torch

    return torch.uint8


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
