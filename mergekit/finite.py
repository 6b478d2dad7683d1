"""NaN and Inf in a merge: in its inputs (a warning, or an error with --strict-finite) and in
its outputs where the inputs have none (an error, or a warning with --allow-nonfinite)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mergekit.errors import merge_failure
from mergekit.io.dtypes import ST_DTYPES

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mergekit.plan import TensorJob

log = logging.getLogger("mergekit")


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

    # one sum is finite only when every element is (NaN and Inf propagate), and is much
    # faster than an elementwise test; an overflowing sum falls back to that test
    return (not tensor.is_floating_point()
            or math.isfinite(tensor.sum(dtype=torch.float32).item())
            or bool(torch.isfinite(tensor).all()))
