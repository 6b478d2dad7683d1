"""The array backends of the one execution path (``execute.py``): what a chunk's inputs are
read into (float32 numpy arrays on the CPU, or float32 torch tensors on the CPU or a GPU),
how results are narrowed to the output dtype and checked for NaN and Inf, and how they come
back to host memory.

CPU merges of methods that take arrays (``Method.arrays``) run on numpy when every input
and the output are float32, float16 or bfloat16 safetensors: such a run never imports
torch, whose import is most of a small merge's time and most of any merge's memory
(``docs/design.md``). Everything else runs on torch."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from mergekit.errors import usage_error
from mergekit.finite import all_finite
from mergekit.io.dtypes import NUMPY_CODES, from_float32, numpy_dtype, to_float32, torch_dtype
from mergekit.io.model import ModelSource
from mergekit.methods.registry import Method
from mergekit.transfer import Transfer

if TYPE_CHECKING:
    from types import ModuleType

    import numpy as np
    import torch

    from mergekit.plan import TensorJob

# Inputs and outputs numpy reads and writes are held as numpy arrays of their stored bytes
# (bfloat16 as uint16): see ``io/dtypes.py``.


class Done:
    """A narrowed output chunk on its way to host memory: ``wait()`` gives it there, with
    whether it holds no NaN or Inf."""

    def __init__(self, out: Any, finite: bool | None = None, total: Any = None,
                 copying: Any = None, pending: Future | None = None) -> None:
        self._out = out
        self._finite = finite
        self._total = total  # torch: a Result holding the chunk's sum, copied back with it
        self._copying = copying  # torch: a Result holding the chunk
        self._pending = pending  # numpy: the (chunk, finite) narrowed on another thread

    def wait(self) -> tuple[Any, bool]:
        if self._pending is not None:
            return self._pending.result()
        out = self._copying.wait() if self._copying is not None else self._out
        finite = self._finite
        if finite is None:
            finite = (math.isfinite(self._total.wait().item())
                      or all_finite(out.float()))  # a sum of finite values may overflow
        return out, finite


class NumpyBackend:
    """numpy on the CPU. Inputs are read into memory of their own (``read_array``). With a
    ``narrower`` (one thread), float16 results are narrowed there while the next chunk is
    merged: numpy's conversion to float16 is slow, and it releases the GIL."""

    name = "numpy"
    # numpy's passes read the inputs again instead of keeping them: its merges stay small
    prepare_cache_bytes = 0
    chunk_scale = 1  # row chunks of CHUNK_ELEMENTS (execute.py)

    def __init__(self, narrower: Executor | None = None) -> None:
        self._narrower = narrower
        self.asynchronous = narrower is not None

    def read(self, source: ModelSource, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        return to_float32(source.read_array(name, rows), source.info(name).dtype)

    def read_stored(self, source: ModelSource, name: str,
                    rows: tuple[int, int] | None) -> tuple[np.ndarray, str]:
        """The stored bytes and their dtype code."""
        return source.read_array(name, rows), source.info(name).dtype

    def values(self, stored: np.ndarray, code: str) -> np.ndarray:
        """Stored bytes as float32 values."""
        return to_float32(stored, code)

    def convert(self, stored: np.ndarray, code: str, out_code: str) -> np.ndarray:
        """Stored bytes of ``code`` as ``out_code`` (the same bits when they agree)."""
        if code == out_code:
            return stored
        values = to_float32(stored, code)
        return from_float32(values, out_code, all_finite(values))

    def empty(self, shape: tuple[int, ...], code: str) -> np.ndarray:
        import numpy as np

        return np.empty(shape, numpy_dtype(code))

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 zeros, where the math is done."""
        import numpy as np

        return np.zeros(shape, np.float32)

    def take(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (a numpy index array) of ``x``."""
        return x[rows]

    def stored_finite(self, stored: np.ndarray, code: str) -> bool:
        return stored_finite(stored, code)

    def finish(self, result: np.ndarray, code: str, check: bool) -> Done:
        # only float16 gains: bfloat16's rounding on its bits is cheaper than the hand-off
        if self._narrower is None or code != "F16":
            return Done(*_narrow(result, code, check))
        return Done(None, pending=self._narrower.submit(_narrow, result, code, check))

    def errstate(self) -> Any:
        """Inf and NaN inputs are merged as torch merges them, without numpy's warnings."""
        import numpy as np

        return np.errstate(all="ignore")

    def set_threads(self, chunked: bool) -> None:
        pass


class TorchBackend:
    """torch on ``device`` (see ``transfer.py`` for how tensors cross to and from a GPU).
    ``threads``: the CPU cores torch may use (see ``set_threads``), None on a GPU."""

    name = "torch"
    # a tensor's inputs are kept between a prepare pass and the merge when they fit
    prepare_cache_bytes = 256 * 1024**2
    # row chunks of 4 x CHUNK_ELEMENTS: torch's per-chunk costs (op dispatch, DARE's
    # draws by 64K-element block) are larger than numpy's (benchmarks/README.md)
    chunk_scale = 4

    def __init__(self, device: torch.device, threads: int | None) -> None:
        self.transfer = Transfer(device)
        self.asynchronous = self.transfer.asynchronous
        self.threads = threads

    def read(self, source: ModelSource, name: str,
             rows: tuple[int, int] | None) -> torch.Tensor:
        import torch

        # moved in its stored dtype (fewer bytes), then widened
        return self.transfer.to_device(source.read(name, rows)).to(torch.float32)

    def read_stored(self, source: ModelSource, name: str,
                    rows: tuple[int, int] | None) -> tuple[torch.Tensor, str]:
        t = source.read(name, rows)
        from mergekit.io.dtypes import st_code

        return t, st_code(t.dtype)

    def values(self, stored: torch.Tensor, code: str) -> torch.Tensor:
        return stored  # torch's checks and counts take any dtype

    def convert(self, stored: torch.Tensor, code: str, out_code: str) -> torch.Tensor:
        return stored.to(torch_dtype(out_code))

    def empty(self, shape: tuple[int, ...], code: str) -> torch.Tensor:
        import torch

        return torch.empty(shape, dtype=torch_dtype(code))

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        return torch.zeros(shape, dtype=torch.float32, device=self.transfer.device)

    def take(self, x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        import torch

        return x[torch.from_numpy(rows).to(x.device)]

    def stored_finite(self, stored: torch.Tensor, code: str) -> bool:
        return math.isfinite(_sum(stored).item()) or all_finite(stored.float())

    def finish(self, result: torch.Tensor, code: str, check: bool) -> Done:
        dtype = torch_dtype(code)
        narrowed = result.to(dtype)
        total = None
        if check:  # copied back with the chunk rather than read by a stalling item()
            summed = _sum(narrowed)
            total = self.transfer.to_host(summed, summed.dtype)
        return Done(None, None if check else True, total,
                    self.transfer.to_host(narrowed, dtype))

    def errstate(self) -> Any:
        return nullcontext()

    def set_threads(self, chunked: bool) -> None:
        """Row-chunk passes of elementwise methods are bound by memory, not arithmetic: on
        the CPU they leave one core to the output's writer and hasher threads, and so do
        light prepare passes over row chunks (``Method.light_prepare``); whole-tensor work
        and other prepare passes use them all (``docs/design.md`` has the figures)."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(max(1, self.threads - 1) if chunked else self.threads)


Backend = NumpyBackend | TorchBackend


def _narrow(result: np.ndarray, code: str, check: bool) -> tuple[np.ndarray, bool]:
    """``result`` narrowed to ``code``, and whether it is finite (True when not ``check``).
    from_float32 looks for NaNs (to give them bfloat16's NaN bits) only when told the values
    may hold some."""
    import numpy as np

    with np.errstate(all="ignore"):
        out = from_float32(result, code, code != "BF16" or all_finite(result))
        return out, stored_finite(out, code) if check else True


@contextmanager
def numpy_backend() -> Iterator[NumpyBackend]:
    """A numpy backend that narrows its results on a thread of its own."""
    with ThreadPoolExecutor(1, thread_name_prefix="narrow") as narrower:
        yield NumpyBackend(narrower)

# The exponent bits of float16 and bfloat16: all set in NaN and Inf only.
_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80}


def stored_finite(raw: np.ndarray, code: str) -> bool:
    """Whether stored bytes (as ``numpy_dtype(code)``) hold no NaN or Inf. For 16-bit
    floats two integer maxima tell, cheaper than any float sum of them: read as int16, the
    NaN and Inf with the sign bit clear are the largest values; read as uint16, those with
    it set are."""
    import numpy as np

    if code == "F32":
        return all_finite(raw)
    exponent = _EXPONENT_BITS[code]
    return (int(raw.view(np.int16).max()) < exponent
            and int(raw.view(np.uint16).max()) < 0x8000 | exponent)


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a float tensor, finite when all its elements are and the sum fits its dtype
    (else ``all_finite`` decides). 16-bit floats are summed in their own dtype (in float32
    inside): twice as fast as a float32 sum of them; torch has no sum of 8-bit floats."""
    import torch

    return tensor.sum(dtype=torch.float32) if tensor.element_size() == 1 else tensor.sum()


def numpy_can_run(job: TensorJob, method: Method, params: Callable[[], Any],
                  sources: Mapping[str, ModelSource]) -> bool:
    """Whether the numpy backend can run the job: a method that takes arrays with the job's
    ``params()``, and inputs and output it reads and writes."""
    refs = [(r.model, r.name) for r in job.inputs + ((job.base,) if job.base else ())]
    refs += job.row_names  # the rows of other models a vocabulary permutation reads
    return (job.dtype in NUMPY_CODES and method.takes_arrays(params())
            and all(sources[m].is_safetensors(n) and sources[m].info(n).dtype in NUMPY_CODES
                    for m, n in refs))


def import_torch() -> ModuleType:
    """Import torch with Python's cyclic garbage collector paused (and then restored as it
    was). The import creates a few hundred thousand long-lived objects, none of them
    garbage, and the full collections they trigger traverse all of them again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if enabled:
            gc.enable()
    return torch


def check_device(name: str, flag_value: str | None = None) -> torch.device:
    """The torch device ``name``, checked: it exists on this machine. ``flag_value``: the
    --device given, if any (else --cuda named it), for the message."""
    torch = import_torch()
    flag = f"--device {flag_value}" if flag_value else "--cuda"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise usage_error(flag, "is not a torch device", "use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise usage_error(flag, "no CUDA device is available",
                              f"run without {flag.split()[0]}")
        if device.index is not None and device.index >= count:
            raise usage_error(flag, f"this machine has {count} CUDA device(s), numbered from "
                              "0", f"use cuda:0 to cuda:{count - 1}")
    return device


@contextmanager
def torch_backend(device_name: str) -> Iterator[TorchBackend]:
    """A torch backend on ``device_name``; torch's intra-op thread count (which the backend
    changes on the CPU) is given back at the end."""
    torch = import_torch()
    device = check_device(device_name)
    threads = torch.get_num_threads()
    try:
        yield TorchBackend(device, threads if device.type == "cpu" else None)
    finally:
        torch.set_num_threads(threads)
