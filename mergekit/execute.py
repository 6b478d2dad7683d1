"""Execute one tensor job: read its inputs (whole, or in row chunks for elementwise
methods), check them for NaN and Inf, run the merge method in float32 and yield the output
in its dtype."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mergekit.errors import merge_failure
from mergekit.io.dtypes import torch_dtype
from mergekit.io.model import ModelSource
from mergekit.methods.registry import Method, MethodParams, PositionalParams
from mergekit.plan import TensorJob
from mergekit.transfer import Transfer

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("mergekit")


# Row chunks of about this many elements (4 MB per float32 input: cache-sized, measured
# fastest on 2 MB-L2 CPUs) bound the memory of elementwise methods on large tensors and
# keep their buffers reusable.
CHUNK_ELEMENTS = 1 << 20
# Methods with a prepare pass keep a tensor's inputs in memory between passes when they
# fit in this many bytes (as float32); larger tensors are read again for each pass.
PREPARE_CACHE_BYTES = 256 * 1024**2


class FiniteCheck:
    """Warns once per input tensor holding NaN or Inf; with ``strict`` that is an error."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        # chunks checked in the current job (passes that read a chunk again skip it)
        self._seen: set[tuple[str, str, tuple[int, int] | None]] = set()
        self._warned: set[tuple[str, str]] = set()

    def next_job(self) -> None:
        """Call as each tensor job begins: the chunks of the last one will not come again,
        and remembering every chunk of a run would grow with the model."""
        self._seen.clear()

    def __call__(self, model: str, name: str, rows: tuple[int, int] | None,
                 tensor: torch.Tensor) -> None:
        if (model, name, rows) in self._seen:
            return
        self._seen.add((model, name, rows))
        if not all_finite(tensor):
            if self.strict:
                raise merge_failure(f"model {model}", f"tensor {name} holds NaN or Inf values",
                                    "fix the input model, or drop --strict-finite to merge "
                                    "anyway")
            if (model, name) not in self._warned:
                self._warned.add((model, name))
                log.warning("model %s: tensor %s holds NaN or Inf values; the merged tensor "
                            "may too (--strict-finite makes this an error)", model, name)


def all_finite(tensor: torch.Tensor | np.ndarray) -> bool:
    """Whether a tensor or numpy array holds no NaN or Inf."""
    import numpy as np

    if isinstance(tensor, np.ndarray):
        with np.errstate(all="ignore"):
            return (tensor.dtype.kind != "f" or math.isfinite(tensor.sum(dtype=np.float32))
                    or bool(np.isfinite(tensor).all()))
    import torch

    # one sum is finite only when every element is (NaN and Inf propagate), and is ~20x
    # faster than an elementwise test; an overflowing sum falls back to that test
    return (not tensor.is_floating_point()
            or math.isfinite(tensor.sum(dtype=torch.float32).item())
            or bool(torch.isfinite(tensor).all()))


def _set_threads(threads: int | None, chunked: bool) -> None:
    """Row-chunk passes of elementwise methods are bound by memory, not arithmetic: on the
    CPU they leave one of ``threads`` cores to the output's writer and hasher threads
    (measured on 2 cores: linear and slerp merges 5% faster, ties unchanged), and so do light
    prepare passes over row chunks (``Method.light_prepare``; slerp 2.5% faster, while ties
    and dare_ties were 4% and 8% slower so). Whole-tensor work and other prepare passes use
    them all. ``None``: leave torch's setting."""
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads - 1) if chunked else threads)


def execute_job(
    job: TensorJob, method: Method, sources: Mapping[str, ModelSource], device: torch.device,
    check: FiniteCheck | None = None, threads: int | None = None,
) -> Iterator[torch.Tensor]:
    """Merge one output tensor in float32 on ``device`` and cast it to the output dtype;
    yields the whole tensor, or consecutive row chunks of it when the method is elementwise,
    in host memory (see ``transfer.py`` for how tensors cross to and from a GPU).
    ``threads``: the CPU cores torch may use (see ``_set_threads``)."""
    import torch

    if check is not None:
        check.next_job()
    out_dtype = torch_dtype(job.dtype)
    if not job.compute:
        ref = job.base or job.inputs[0]
        yield _fit(sources[ref.model].read(ref.name), job.shape, None).to(out_dtype)
        return
    if math.prod(job.shape) == 0:  # nothing to merge (methods need not handle it)
        yield torch.empty(job.shape, dtype=out_dtype)
        return
    params = job_params(job, method)
    if method.copies_input(params):  # the result is the input's bits: no float32 round trip
        (ref,) = job.inputs
        for rows in _row_chunks(job, method, params, sources):
            t = sources[ref.model].read(ref.name, rows)
            if check is not None:
                check(ref.model, ref.name, rows, t)
            yield _fit(t, job.shape if rows is None else tuple(t.shape), None).to(out_dtype)
        return

    def inputs(
        rows: tuple[int, int] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
        def load(model: str, name: str) -> torch.Tensor:
            raw = sources[model].read(name, rows)
            # moved in its stored dtype (fewer bytes), then widened
            t = transfer.to_device(raw).to(torch.float32)
            if check is not None and not method.keeps_nonfinite:
                check(model, name, rows, t)
            return t

        return chunk_inputs(job, rows, load)

    transfer = Transfer(device)
    chunks = _row_chunks(job, method, params, sources)
    loaded = None
    _set_threads(threads, chunked=len(chunks) > 1 and method.light_prepare)
    if method.prepare is not None:
        if _f32_bytes(job) <= PREPARE_CACHE_BYTES:  # read once, for every pass
            loaded = [inputs(rows) for rows in chunks]
            params = method.prepare(lambda: loaded, params)
        else:  # too large to hold: each pass reads the chunks again
            params = method.prepare(lambda: (inputs(rows) for rows in chunks), params)
    _set_threads(threads, chunked=len(chunks) > 1)
    pending = None  # the previous chunk's result, on its way to host memory
    for n, rows in enumerate(chunks):
        result, _ = merge_chunk(job, method, params, loaded[n] if loaded is not None
                                else inputs(rows), rows, check)
        copying = transfer.to_host(result, out_dtype)
        if not transfer.asynchronous:
            yield copying.wait()
            continue
        if pending is not None:  # collected once the device has the next chunk's work
            yield pending.wait()
        pending = copying
    if pending is not None:
        yield pending.wait()


def job_params(job: TensorJob, method: Method) -> MethodParams:
    """The method's params for the job; positional ones learn the tensor's size."""
    params = method.make_params(dict(job.params))
    if isinstance(params, PositionalParams):
        params = params.model_copy(update={"numel": math.prod(job.shape)})
    return params


def chunk_inputs(
    job: TensorJob, rows: tuple[int, int] | None, load: Callable[[str, str], Any],
) -> tuple[list[Any], Any | None, int]:
    """A row chunk's float32 inputs (or the whole tensor's, for ``rows`` None) fitted to
    the job's shape, its base, and the flat index of its first element. ``load(model,
    name)`` reads one input's rows in float32 (a tensor or a numpy array)."""
    shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    base = _fit(load(job.base.model, job.base.name), shape, None) if job.base else None
    offset = rows[0] * math.prod(job.shape[1:]) if rows else 0
    return [_fit(load(r.model, r.name), shape, base) for r in job.inputs], base, offset


def merge_chunk(
    job: TensorJob, method: Method, params: MethodParams,
    chunk: tuple[list[Any], Any | None, int], rows: tuple[int, int] | None,
    check: FiniteCheck | None,
) -> tuple[Any, bool | None]:
    """The method's float32 result on one chunk (from ``chunk_inputs``), and whether it is
    all finite where that was checked (None where it was not). For a method that keeps
    NaN and Inf, a result that is not finite has its inputs checked, to name them."""
    tensors, base, offset = chunk
    if isinstance(params, PositionalParams):  # results follow the element's position
        params = params.model_copy(update={"offset": offset})
    result = method.fn(tensors, base, params)
    finite = None
    if check is not None and method.keeps_nonfinite:
        finite = all_finite(result)
        if not finite:  # the result is not finite where an input is not: find which ones
            for ref, t in zip((job.base, *job.inputs) if job.base else job.inputs,
                              ([base] if job.base else []) + tensors):
                check(ref.model, ref.name, rows, t)
    if tuple(result.shape) != tuple(tensors[0].shape):
        raise RuntimeError(f"internal: {job.method} returned shape {tuple(result.shape)} "
                           f"for {job.output_name}, expected {tuple(tensors[0].shape)}")
    return result, finite


def _f32_bytes(job: TensorJob) -> int:
    """Bytes of all of a job's inputs in float32."""
    return math.prod(job.shape) * 4 * (len(job.inputs) + (1 if job.base else 0))


def _row_chunks(
    job: TensorJob, method: Method, params: object, sources: Mapping[str, ModelSource],
    chunk_elements: int | None = None,
) -> list[tuple[int, int] | None]:
    """[None] for one whole-tensor call, else row ranges covering the first dimension, of
    about ``chunk_elements`` (default ``CHUNK_ELEMENTS``) elements."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    numel = math.prod(job.shape)
    # 1-D tensors stay whole: row-wise methods (della) treat them as one row
    if numel <= chunk_elements or len(job.shape) < 2 or not method.runs_elementwise(params):
        return [None]
    refs = ([job.base] if job.base else []) + list(job.inputs)
    if any(sources[r.model].info(r.name).shape != job.shape for r in refs):
        return [None]  # inputs to crop or pad: do it on whole tensors
    step = max(1, chunk_elements // max(1, numel // job.shape[0]))
    return [(i, min(i + step, job.shape[0])) for i in range(0, job.shape[0], step)]


def _fit(x: torch.Tensor, shape: tuple[int, ...], base: torch.Tensor | None) -> torch.Tensor:
    """Crop ``x`` to ``shape``; rows it lacks are taken from ``base`` (vocab mismatch).
    Tensors or numpy arrays."""
    import numpy as np

    if tuple(x.shape) == shape:
        return x
    crop = x[tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape))]
    if tuple(crop.shape) == shape:
        return crop
    if base is None:
        raise RuntimeError(f"internal: cannot fit shape {tuple(x.shape)} to {shape}")
    out = base.copy() if isinstance(base, np.ndarray) else base.clone()
    out[tuple(slice(0, d) for d in crop.shape)] = crop
    return out
