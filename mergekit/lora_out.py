"""``--lora-out RANK``: a merge written as a LoRA adapter of its base model. Each tensor is
merged as usual (``execute.py``), then compared with the base's: a changed matrix becomes
its truncated SVD at most RANK (``lora/factor.py``), a changed embedding an embedding
LoRA, any other changed tensor (norms, biases, a resized vocabulary) is saved whole
(``modules_to_save``); unchanged tensors are left out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergekit.architecture import embedding_name
from mergekit.backends import Backend
from mergekit.execute import execute_job
from mergekit.finite import FiniteCheck
from mergekit.io.dtypes import NUMPY_CODES, to_float32
from mergekit.io.model import ModelSource
from mergekit.lora.adapter_out import AdapterOutput
from mergekit.lora.factor import factorize
from mergekit.methods.registry import Method
from mergekit.plan import MergePlan

# a difference to the base at most this fraction of the base's largest value (a few float32
# roundings) counts as no change
UNCHANGED = 2.0**-20


def _float32(value: Any, code: str) -> Any:
    """A result chunk (numpy stored bytes or a torch tensor) as float32 numpy values."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return to_float32(value, code).astype(np.float32, copy=False)
    return value.float().numpy()


def _base_values(source: ModelSource, name: str) -> Any:
    info = source.info(name)
    if source.is_safetensors(name) and info.dtype in NUMPY_CODES:
        return to_float32(source.read_array(name), info.dtype)
    return source.read(name).float().numpy()


def merge_to_adapter(plan: MergePlan, sources: Mapping[str, ModelSource], base: str,
                     rank: int, method: Method, backend: Backend, check: FiniteCheck,
                     bar: Any, seed: int = 0) -> AdapterOutput:
    """The merge as a LoRA adapter of the model ``base`` (a key of ``sources``)."""
    import numpy as np

    base_source = sources[base]
    adapter = AdapterOutput(base)
    embed = embedding_name(base_source.names)
    for job in plan.jobs:
        chunks = [_float32(c, job.dtype) for c in execute_job(job, method, sources, backend,
                                                             check)]
        bar.update(job.nbytes)
        result = (np.concatenate([c.reshape(-1, *job.shape[1:]) for c in chunks])
                  .reshape(job.shape) if chunks else np.zeros(job.shape, np.float32))
        name = job.output_name
        if name not in base_source.weight_map or base_source.info(name).shape != job.shape:
            adapter.add_full(name, result)  # new to the base, or resized (vocabulary)
            continue
        before = _base_values(base_source, name)
        delta = result - before
        # unchanged but for float32 rounding (0.3 * W + 0.7 * W is not always W): left out
        if float(np.abs(delta).max(initial=0)) <= UNCHANGED * float(np.abs(before).max(
                initial=0)):
            continue
        if delta.ndim != 2 or not name.endswith(".weight"):
            adapter.add_full(name, result)
            continue
        module = name.removesuffix(".weight")
        if name == embed:  # peft's embedding LoRA holds (B @ A)^T
            a, b = factorize(np.ascontiguousarray(delta.T), rank, seed=seed)
            adapter.add_embedding(module, a, b)
        else:
            a, b = factorize(delta, rank, seed=seed)
            adapter.add_linear(module, a, b)
    return adapter


def check_lora_cat(models: list[Any], base: Any) -> None:
    """lora_cat needs every model to be ``base+adapter`` of the recipe's base model."""
    from mergekit.errors import usage_error

    for i, ref in enumerate(models):
        if ref.lora is None or ref.model != base:
            raise usage_error(f"models[{i}].model", f"{ref} is not an adapter of the base "
                              f"model {base}", f"lora_cat combines adapters: write "
                              f"'{base}+ADAPTER'")


def cat_adapters(plan: MergePlan, sources: Mapping[str, ModelSource], base: str,
                 method: Method, backend: Backend, check: FiniteCheck, bar: Any
                 ) -> AdapterOutput:
    """The lora_cat adapter: per weight, the adapters' factors concatenated, B scaled by
    the weight and scaling of its adapter. A tensor an adapter replaces whole is merged
    (the base plus the weighted changes) and saved whole."""
    import numpy as np

    from mergekit.errors import usage_error

    adapter = AdapterOutput(base)
    for job in plan.jobs:
        name = job.output_name
        refs = list(job.inputs)
        weights = job.params.get("weight") or (1.0,) * len(refs)
        adapters = [sources[r.model].adapter for r in refs]  # type: ignore[attr-defined]
        if any(r.name in a.full for r, a in zip(refs, adapters)):
            chunks = [_float32(c, job.dtype) for c in execute_job(job, method, sources,
                                                                 backend, check)]
            adapter.add_full(name, np.concatenate([c.reshape(-1, *job.shape[1:])
                                                   for c in chunks]).reshape(job.shape))
        else:
            parts = [(a.modules[r.name], a, w) for r, a, w in zip(refs, adapters, weights)
                     if r.name in a.modules]
            if parts:
                kinds = {m.transposed for m, _, _ in parts}
                embedding = name == embedding_name(sources[base].names)
                if kinds != {embedding}:  # fan_in_fan_out weights: not written by peft's cat
                    raise usage_error(f"lora_cat: {name}", "fan_in_fan_out adapters cannot be "
                                      "concatenated here", "use --lora-out RANK instead")
                a = np.concatenate([ad.array(m.a_key) for m, ad, _ in parts])
                b = np.concatenate([ad.array(m.b_key) * (w * m.scaling) for m, ad, w in parts],
                                   axis=1)
                module = name.removesuffix(".weight")
                if embedding:
                    adapter.add_embedding(module, a, b)
                else:
                    adapter.add_linear(module, a, b)
        bar.update(job.nbytes)
    return adapter
