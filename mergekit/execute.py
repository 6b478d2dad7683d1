"""Execute one tensor job: read its inputs (whole, or in row chunks for elementwise
methods), check them for NaN and Inf, run the merge method in float32 and yield the output
in its dtype, checked for NaN and Inf its inputs lack."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mergekit.errors import merge_failure
from mergekit.io.dtypes import ST_DTYPES, torch_dtype
from mergekit.io.model import ModelSource
from mergekit.methods.registry import Method, MethodParams, PositionalParams
from mergekit.plan import TensorJob
from mergekit.transfer import Result, Transfer

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
    """NaN and Inf. An input tensor holding them gets a warning, once (with ``strict``, an
    error). A merged tensor holding them, once cast to the output dtype, where its inputs do
    not (overflow: large weights, a narrow output dtype) fails the merge (with
    ``allow_output``, a warning, once per tensor)."""

    def __init__(self, strict: bool, allow_output: bool = False) -> None:
        self.strict = strict
        self.allow_output = allow_output
        # chunks checked in the current job (passes that read a chunk again skip it)
        self._seen: set[tuple[str, str, tuple[int, int] | None]] = set()
        # whether an input chunk of the current job held NaN or Inf
        self._bad_input = False
        self._warned: set[tuple[str, str]] = set()
        # NaN and Inf values of the current job's output that its inputs do not explain
        self._nan = self._inf = 0

    def next_job(self) -> None:
        """Call as each tensor job begins: the chunks of the last one will not come again,
        and remembering every chunk of a run would grow with the model."""
        self._seen.clear()
        self._bad_input = False
        self._nan = self._inf = 0

    def __call__(self, model: str, name: str, rows: tuple[int, int] | None,
                 tensor: torch.Tensor) -> None:
        if (model, name, rows) in self._seen:
            return
        self._seen.add((model, name, rows))
        if not all_finite(tensor):
            self._bad_input = True
            if self.strict:
                raise merge_failure(f"model {model}", f"tensor {name} holds NaN or Inf values",
                                    "fix the input model, or drop --strict-finite to merge "
                                    "anyway")
            if (model, name) not in self._warned:
                self._warned.add((model, name))
                log.warning("model %s: tensor %s holds NaN or Inf values; the merged tensor "
                            "may too (--strict-finite makes this an error)", model, name)

    def output(self, job: TensorJob, rows: tuple[int, int] | None,
               load: Callable[[tuple[int, int] | None], Any],
               values: Callable[[], Any]) -> None:
        """Call for an output chunk (``rows``) holding NaN or Inf once cast to the output
        dtype: checks its inputs, and counts its values for ``finish_job``. ``load(rows)``
        reads a chunk's inputs again as ``chunk_inputs`` gives them (the methods that keep
        NaN and Inf leave them unchecked until here); ``values()``: the output chunk as
        float32."""
        refs = ((job.base,) if job.base else ()) + job.inputs
        if not all((r.model, r.name, rows) in self._seen for r in refs):
            tensors, base, _ = load(rows)
            for ref, t in zip(refs, ([base] if job.base else []) + tensors):
                self(ref.model, ref.name, rows, t)
        if not self._bad_input:  # else the output's NaN and Inf are the input's
            nan, inf = nonfinite_counts(values())
            self._nan += nan
            self._inf += inf

    def finish_job(self, job: TensorJob) -> None:
        """Call after a job's last chunk: fails (or warns) when its output held NaN or Inf
        and its inputs did not. Any input chunk's NaN or Inf excuses the whole tensor's (a
        prepare pass spreads them over every chunk), which also makes the verdict the same
        for every chunk size. Every input chunk that may hold them has been checked by then:
        those the method reads always; for methods that keep NaN and Inf, those of every
        chunk whose output holds some."""
        if self._bad_input or not (self._nan or self._inf):
            return
        counts = " and ".join(f"{n} {what}" for n, what in ((self._nan, "NaN"),
                                                            (self._inf, "Inf")) if n)
        params = ", ".join(f"{k}={_shown(v)}" for k, v in job.params.items())
        settings = f"{ST_DTYPES[job.dtype][0]} output" + (f"; {params}" if params else "")
        what = f"the merged tensor holds {counts} values ({settings}) but its inputs do not"
        if self.allow_output:
            log.warning("%s: %s; written anyway (--allow-nonfinite)", job.output_name, what)
            return
        raise merge_failure(job.output_name, what,
                            f"{_nonfinite_fix(job)}; --allow-nonfinite writes it anyway")


def _shown(value: Any) -> str:
    """A resolved parameter value as a recipe writes it: per-model tuples as lists."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _nonfinite_fix(job: TensorJob) -> str:
    """What to change when a merged tensor overflows."""
    fixes = []
    if "weight" in job.params:
        fixes.append("lower the weights")
    if job.params.get("normalize") is False:
        fixes.append("set normalize: true")
    if job.dtype == "F16":
        fixes.append("use a wider dtype (float32/bfloat16)")
    if not fixes:
        return "check the merge's parameters"
    return ", ".join(fixes[:-1]) + ", or " + fixes[-1] if len(fixes) > 1 else fixes[0]


def nonfinite_counts(values: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """How many NaN and how many Inf values a float tensor or array holds."""
    import numpy as np

    if isinstance(values, np.ndarray):
        return int(np.isnan(values).sum()), int(np.isinf(values).sum())
    import torch

    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


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

        def read(rows: tuple[int, int] | None) -> torch.Tensor:
            return sources[ref.model].read(ref.name, rows)

        chunks = _row_chunks(job, method, params, sources)
        for rows in chunks:
            t = read(rows)
            if check is not None:
                check(ref.model, ref.name, rows, t)
            out = _fit(t, job.shape if rows is None else tuple(t.shape), None).to(out_dtype)
            # the same bits as the input unless narrowed, maybe past the dtype's range
            if check is not None and out.dtype != t.dtype \
                    and not math.isfinite(_sum(out).item()) and not all_finite(out.float()):
                check.output(job, rows, lambda r: ([read(r)], None, 0),
                             lambda out=out: out.float())
            yield out
        if check is not None:
            check.finish_job(job)
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

    def collect(rows: tuple[int, int] | None, copying: Result, total: Result | None,
                ) -> torch.Tensor:
        """The output chunk in host memory, once checked for NaN and Inf (``total``: its
        float32 sum, copied back with it rather than read by a stalling ``item()``)."""
        out = copying.wait()
        if check is None or total is None or math.isfinite(total.wait().item()):
            return out
        if not all_finite(out.float()):  # (a sum of finite values may overflow)
            check.output(job, rows,
                         lambda r: loaded[chunks.index(r)] if loaded is not None else inputs(r),
                         lambda: out.float())
        return out

    pending = None  # the previous chunk's result, on its way to host memory
    for n, rows in enumerate(chunks):
        result = merge_chunk(job, method, params, loaded[n] if loaded is not None
                             else inputs(rows))
        narrowed = result.to(out_dtype)
        del result
        # NaN and Inf are looked for after the cast: values past float16's range become Inf
        total = None
        if check is not None:
            summed = _sum(narrowed)
            total = transfer.to_host(summed, summed.dtype)
        copying = (rows, transfer.to_host(narrowed, out_dtype), total)
        if not transfer.asynchronous:
            yield collect(*copying)
            continue
        if pending is not None:  # collected once the device has the next chunk's work
            yield collect(*pending)
        pending = copying
    if pending is not None:
        yield collect(*pending)
    if check is not None:
        check.finish_job(job)


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a float tensor, finite when all its elements are and the sum fits its dtype
    (else ``all_finite`` decides). 16-bit floats are summed in their own dtype (in float32
    inside): twice as fast as a float32 sum of them; torch has no sum of 8-bit floats."""
    import torch

    return tensor.sum(dtype=torch.float32) if tensor.element_size() == 1 else tensor.sum()


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
    chunk: tuple[list[Any], Any | None, int],
) -> Any:
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
