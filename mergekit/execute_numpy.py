"""Execute one tensor job on numpy instead of torch: CPU merges whose method takes arrays
(``Method.arrays``: linear, slerp, passthrough, task_arithmetic, karcher, multislerp,
model_stock and nuslerp, some only with some parameters) and whose inputs and output are
float32, float16 or bfloat16 safetensors. The output has the bytes ``execute.execute_job`` gives
(tests check), and the run never loads torch, whose import costs a second and 200 MB:
most of a small merge's time, and most of any merge's memory. torch's conversions are
faster per element, but its fresh buffers cost more page faults; measured, numpy is as
fast or faster at every size tried (see ``run.NUMPY_ENGINE``)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from mergekit.execute import (
    FiniteCheck,
    _fit,
    _row_chunks,
    all_finite,
    chunk_inputs,
    job_params,
    merge_chunk,
)
from mergekit.io.dtypes import NUMPY_CODES, from_float32, numpy_dtype, to_float32
from mergekit.io.model import ModelSource
from mergekit.methods.registry import Method
from mergekit.plan import TensorJob

if TYPE_CHECKING:
    import numpy as np

# Row chunks of about this many elements (1 MB as float32): numpy's passes over a chunk's
# inputs and temporaries stay in a 2 MB L2 cache (3-model linear on 0.6 GB models: 9%
# faster than torch's 1M-element chunks).
CHUNK_ELEMENTS = 1 << 18


def numpy_can_run(job: TensorJob, method: Method, sources: Mapping[str, ModelSource]) -> bool:
    """Whether ``execute_job_numpy`` can run the job (on the CPU)."""
    refs = job.inputs + ((job.base,) if job.base else ())
    return (job.dtype in NUMPY_CODES and method.takes_arrays(job_params(job, method))
            and all(sources[r.model].is_safetensors(r.name)
                    and sources[r.model].info(r.name).dtype in NUMPY_CODES for r in refs))


def execute_job_numpy(
    job: TensorJob, method: Method, sources: Mapping[str, ModelSource],
    check: FiniteCheck | None = None,
) -> Iterator[np.ndarray]:
    """``execute.execute_job`` on the CPU with numpy: yields the output's stored bytes (as
    ``numpy_dtype(job.dtype)``), whole or in consecutive row chunks."""
    import numpy as np

    if check is not None:
        check.next_job()

    def read(model: str, name: str, rows: tuple[int, int] | None) -> tuple[np.ndarray, str]:
        """The stored bytes, and their dtype code."""
        return sources[model].read_array(name, rows), sources[model].info(name).dtype

    if not job.compute:
        ref = job.base or job.inputs[0]
        raw, code = read(ref.model, ref.name, None)
        yield _narrow(_fit(raw, job.shape, None), code, job.dtype)
        return
    if math.prod(job.shape) == 0:  # nothing to merge (methods need not handle it)
        yield np.empty(job.shape, numpy_dtype(job.dtype))
        return
    params = job_params(job, method)
    if method.copies_input(params):  # the result is the input's bits: no float32 round trip
        (ref,) = job.inputs
        chunks = _row_chunks(job, method, params, sources, CHUNK_ELEMENTS)
        for rows in chunks:
            raw, code = read(ref.model, ref.name, rows)
            if check is not None:
                check(ref.model, ref.name, rows, to_float32(raw, code))
            out = _narrow(_fit(raw, job.shape if rows is None else raw.shape, None), code,
                          job.dtype)
            # the same bits as the input unless narrowed, maybe past the dtype's range
            if check is not None and code != job.dtype and not _stored_finite(out, job.dtype):
                check.output(job, rows,
                             lambda r: ([to_float32(*read(ref.model, ref.name, r))], None, 0),
                             lambda out=out: to_float32(out, job.dtype))
            yield out
        if check is not None:
            check.finish_job(job)
        return

    def inputs(
        rows: tuple[int, int] | None,
    ) -> tuple[list[np.ndarray], np.ndarray | None, int]:
        def load(model: str, name: str) -> np.ndarray:
            t = to_float32(*read(model, name, rows))
            if check is not None and not method.keeps_nonfinite:
                check(model, name, rows, t)
            return t

        return chunk_inputs(job, rows, load)

    chunks = _row_chunks(job, method, params, sources, CHUNK_ELEMENTS)
    # Inf and NaN inputs are merged as torch merges them, without numpy's warnings
    if method.prepare is not None:
        with np.errstate(all="ignore"):
            params = method.prepare(lambda: (inputs(rows) for rows in chunks), params)
    for rows in chunks:
        with np.errstate(all="ignore"):
            result = merge_chunk(job, method, params, inputs(rows))
            # from_float32 looks for NaNs (to give them bfloat16's NaN bits) only when told
            # the values may hold some
            out = from_float32(result, job.dtype, job.dtype != "BF16" or all_finite(result))
        # NaN and Inf are looked for after the cast: values past float16's range become Inf
        if check is not None and not _stored_finite(out, job.dtype):
            check.output(job, rows, inputs,
                         lambda out=out: to_float32(out, job.dtype))
        yield out
    if check is not None:
        check.finish_job(job)


# The exponent bits of float16 and bfloat16: all set in NaN and Inf only.
_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80}


def _stored_finite(raw: np.ndarray, code: str) -> bool:
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


def _narrow(raw: np.ndarray, code: str, out_code: str) -> np.ndarray:
    """Stored bytes of dtype ``code`` as ``out_code`` (the same bits when they agree)."""
    if code == out_code:
        return raw
    values = to_float32(raw, code)
    return from_float32(values, out_code, all_finite(values))
