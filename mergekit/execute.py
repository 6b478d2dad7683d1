"""The one execution path: execute a tensor job over an array backend (``backends.py``:
numpy, or torch on the CPU or a GPU). Its inputs are read whole, or in row chunks for
elementwise methods, checked for NaN and Inf, merged in float32 and narrowed to the output
dtype, which is checked for NaN and Inf its inputs lack."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mergekit.backends import Backend, Done
from mergekit.finite import FiniteCheck
from mergekit.io.model import ModelSource
from mergekit.methods.registry import Method, MethodParams, PositionalParams
from mergekit.plan import TensorJob

# Row chunks of about this many elements (1 MB as float32) bound the memory of elementwise
# methods on large tensors, keep their buffers reusable, and keep numpy's passes over a
# chunk in a 2 MB L2 cache. The one chunk-size setting: a backend's chunks are
# ``chunk_scale`` times this (``backends.py``).
CHUNK_ELEMENTS = 1 << 18

Chunk = tuple[list[Any], Any, int]  # float32 inputs, base (or None), first element's index


def execute_job(
    job: TensorJob, method: Method, sources: Mapping[str, ModelSource], backend: Backend,
    check: FiniteCheck | None = None,
) -> Iterator[Any]:
    """Merge one output tensor in float32 and narrow it to the output dtype; yields the
    whole tensor, or consecutive row chunks of it when the method is elementwise, in host
    memory (numpy arrays of the stored bytes, or torch tensors)."""
    if check is not None:
        check.next_job()
    if not job.compute:
        ref = job.base or job.inputs[0]
        stored, code = backend.read_stored(sources[ref.model], ref.name, None)
        yield backend.convert(_fit(stored, job.shape, None), code, job.dtype)
        return
    if math.prod(job.shape) == 0:  # nothing to merge (methods need not handle it)
        yield backend.empty(job.shape, job.dtype)
        return
    params = job_params(job, method)
    chunks = row_chunks(job, method, params, sources, CHUNK_ELEMENTS * backend.chunk_scale)
    gather = RowGather(job, sources, backend) if job.rows is not None else None
    # the result is the input's bits: no float32 round trip
    if method.copies_input(params) and gather is None:
        yield from _copy(job, sources, backend, check, chunks)
        return

    def inputs(rows: tuple[int, int] | None) -> Chunk:
        def load(model: str, name: str) -> Any:
            if gather is not None:  # rows permuted into the output vocabulary
                t = gather.rows(model, rows or (0, job.shape[0]))
                if check is not None and not method.keeps_nonfinite:
                    check(model, name, rows, t)
                return t
            t = backend.read(sources[model], name, rows)
            if check is not None and not method.keeps_nonfinite:
                check(model, name, rows, t)
            return t

        return chunk_inputs(job, rows, load)

    loaded: list[Chunk] | None = None
    backend.set_threads(chunked=len(chunks) > 1 and method.light_prepare)
    if method.prepare is not None:
        with backend.errstate():
            if _f32_bytes(job) <= backend.prepare_cache_bytes:  # read once, for every pass
                loaded = [inputs(rows) for rows in chunks]
                params = method.prepare(lambda: loaded, params)
            else:  # each pass reads the chunks again
                params = method.prepare(lambda: (inputs(rows) for rows in chunks), params)
    backend.set_threads(chunked=len(chunks) > 1)

    def collect(rows: tuple[int, int] | None, done: Done) -> Any:
        """The output chunk in host memory, once checked for NaN and Inf."""
        out, finite = done.wait()
        if check is not None and not finite:
            check.output(job, rows,
                         lambda r: loaded[chunks.index(r)] if loaded is not None else inputs(r),
                         lambda: backend.values(out, job.dtype))
        return out

    pending = None  # the previous chunk's result, on its way to host memory
    for n, rows in enumerate(chunks):
        with backend.errstate():
            result = merge_chunk(job, method, params,
                                 loaded[n] if loaded is not None else inputs(rows))
            # NaN and Inf are looked for after the cast: values past float16's range are Inf
            done = backend.finish(result, job.dtype, check is not None)
        del result
        if not backend.asynchronous:
            yield collect(rows, done)
            continue
        if pending is not None:  # collected once the device has the next chunk's work
            yield collect(*pending)
        pending = (rows, done)
    if pending is not None:
        yield collect(*pending)
    if check is not None:
        check.finish_job(job)


def _copy(job: TensorJob, sources: Mapping[str, ModelSource], backend: Backend,
          check: FiniteCheck | None, chunks: list[tuple[int, int] | None]) -> Iterator[Any]:
    """A job whose result is its one input: its stored bytes, narrowed where the output
    dtype differs (and then checked, as values may pass the dtype's range)."""
    (ref,) = job.inputs
    source = sources[ref.model]
    for rows in chunks:
        stored, code = backend.read_stored(source, ref.name, rows)
        if check is not None:
            check(ref.model, ref.name, rows, backend.values(stored, code))
        out = backend.convert(_fit(stored, job.shape if rows is None else tuple(stored.shape),
                                   None), code, job.dtype)
        if check is not None and code != job.dtype and not backend.stored_finite(out,
                                                                                 job.dtype):
            check.output(job, rows,
                         lambda r: ([backend.values(*backend.read_stored(source, ref.name, r))],
                                    None, 0),
                         lambda out=out: backend.values(out, job.dtype))
        yield out
    if check is not None:
        check.finish_job(job)


def job_params(job: TensorJob, method: Method) -> MethodParams:
    """The method's params for the job; positional ones learn the tensor's size."""
    params = method.make_params(dict(job.params))
    if isinstance(params, PositionalParams):
        params = params.model_copy(update={"numel": math.prod(job.shape)})
    return params


def chunk_inputs(
    job: TensorJob, rows: tuple[int, int] | None, load: Callable[[str, str], Any],
) -> Chunk:
    """A row chunk's float32 inputs (or the whole tensor's, for ``rows`` None) fitted to
    the job's shape, its base, and the flat index of its first element. ``load(model,
    name)`` reads one input's rows in float32 (a tensor or a numpy array)."""
    shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    base = _fit(load(job.base.model, job.base.name), shape, None) if job.base else None
    offset = rows[0] * math.prod(job.shape[1:]) if rows else 0
    return [_fit(load(r.model, r.name), shape, base) for r in job.inputs], base, offset


def merge_chunk(job: TensorJob, method: Method, params: MethodParams, chunk: Chunk) -> Any:
    """The method's float32 result on one chunk (from ``chunk_inputs``)."""
    tensors, base, offset = chunk
    if isinstance(params, PositionalParams):  # results follow the element's position
        params = params.model_copy(update={"offset": offset})
    result = method.fn(tensors, base, params)
    if tuple(result.shape) != tuple(tensors[0].shape):
        raise RuntimeError(f"internal: {job.method} returned shape {tuple(result.shape)} "
                           f"for {job.output_name}, expected {tuple(tensors[0].shape)}")
    return result


def _f32_bytes(job: TensorJob) -> int:
    """Bytes of all of a job's inputs in float32."""
    return math.prod(job.shape) * 4 * (len(job.inputs) + (1 if job.base else 0))


def row_chunks(
    job: TensorJob, method: Method, params: object, sources: Mapping[str, ModelSource],
    chunk_elements: int,
) -> list[tuple[int, int] | None]:
    """[None] for one whole-tensor call, else row ranges covering the first dimension, of
    about ``chunk_elements`` elements."""
    numel = math.prod(job.shape)
    # 1-D tensors stay whole: row-wise methods (della) treat them as one row
    if numel <= chunk_elements or len(job.shape) < 2 or not method.runs_elementwise(params):
        return [None]
    refs = ([job.base] if job.base else []) + list(job.inputs)
    if job.rows is None and any(sources[r.model].info(r.name).shape != job.shape
                                for r in refs):
        return [None]  # inputs to crop or pad: do it on whole tensors
    step = max(1, chunk_elements // max(1, numel // job.shape[0]))
    return [(i, min(i + step, job.shape[0])) for i in range(0, job.shape[0], step)]


def _fit(x: Any, shape: tuple[int, ...], base: Any) -> Any:
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


class RowGather:
    """A job's input rows permuted into the output vocabulary (``vocab_plan.py``): runs of
    a model's own consecutive rows are read as one range, substitutes are other rows
    averaged (or zeros), padding rows the model's mean over its rows for the output's
    tokens, read once per job."""

    def __init__(self, job: TensorJob, sources: Mapping[str, ModelSource],
                 backend: Backend) -> None:
        import numpy as np

        assert job.rows is not None
        self.job, self.sources, self.backend = job, sources, backend
        self.names = dict(job.row_names)
        self.own = {m: r.own for m, r in job.rows.maps.items()}
        self.subs = {m: np.asarray(sorted(r.subs), dtype=np.int64)
                     for m, r in job.rows.maps.items()}
        self._means: dict[str, Any] = {}

    def _read(self, model: str, start: int, end: int) -> Any:
        return self.backend.read(self.sources[model], self.names[model], (start, end))

    def rows(self, model: str, rows: tuple[int, int]) -> Any:
        import numpy as np

        from mergekit.vocab_plan import MEAN

        a, b = rows
        width = tuple(self.job.shape[1:])
        own = self.own[model][a:b]
        keys = self.subs[model]
        lo_key, hi_key = np.searchsorted(keys, a), np.searchsorted(keys, b)
        if lo_key == hi_key and own[0] >= 0 and np.array_equal(
                own, np.arange(own[0], own[0] + b - a)):  # one run, as most chunks are
            return self._read(model, int(own[0]), int(own[0]) + b - a)
        out = self.backend.zeros((b - a, *width))
        ok = np.flatnonzero(own >= 0)
        if ok.size:
            # a new run starts wherever the next output row is not the next input row
            breaks = np.flatnonzero((np.diff(ok) != 1) | (np.diff(own[ok]) != 1)) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [ok.size]))
            lo, hi = int(own[ok].min()), int(own[ok].max()) + 1
            if starts.size > 8 and hi - lo <= 4 * (b - a):  # scattered: one read, then pick
                block = self._read(model, lo, hi)
                out[ok] = self.backend.take(block, own[ok] - lo)
            else:
                for s, e in zip(starts.tolist(), ends.tolist()):
                    first = int(own[ok[s]])
                    out[int(ok[s]):int(ok[s]) + e - s] = self._read(model, first, first + e - s)
        subs = self.job.rows.maps[model].subs
        for i in keys[lo_key:hi_key].tolist():
            sub = subs[i]
            if sub == MEAN:
                out[i - a] = self._mean(model)
            elif sub:
                total = None
                for m, r in sub:
                    row = self._read(m, r, r + 1)[0]
                    total = row if total is None else total + row
                out[i - a] = total / len(sub)
        return out

    def _mean(self, model: str) -> Any:
        """The mean of the model's rows that the output's tokens use, in float32."""
        import numpy as np

        if model not in self._means:
            used = np.unique(self.own[model][self.own[model] >= 0])
            total, n = None, int(used.size)
            step = max(1, CHUNK_ELEMENTS // max(1, math.prod(self.job.shape[1:])))
            for start in range(0, int(used.max()) + 1 if n else 0, step):
                pick = used[(used >= start) & (used < start + step)]
                if pick.size:
                    block = self.backend.take(self._read(model, start, int(pick.max()) + 1),
                                              pick - start)
                    part = block.sum(0)
                    total = part if total is None else total + part
            self._means[model] = (total / max(n, 1) if total is not None
                                  else self.backend.zeros(tuple(self.job.shape[1:])))
        return self._means[model]
