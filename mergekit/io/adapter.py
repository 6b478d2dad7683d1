"""PEFT LoRA adapters as merge inputs: a model read through its adapter (``model+adapter``)
gives each adapted weight as W + scaling * B @ A, computed row chunk by row chunk as the
engine reads it, as peft's ``merge_and_unload`` would; no model is loaded and nothing is
written anywhere. Reading an adapter imports neither peft nor transformers.

peft's semantics: ``scaling`` = lora_alpha / r, or lora_alpha / sqrt(r) with
``use_rslora``, r and alpha per module from ``rank_pattern`` and ``alpha_pattern``;
``fan_in_fan_out`` weights (GPT-2's Conv1D) and embeddings hold the transposed product;
``modules_to_save`` tensors (and trained biases) replace the model's."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit.errors import merge_failure, usage_error
from mergekit.io.dtypes import NUMPY_CODES, from_float32, to_float32, torch_dtype
from mergekit.io.model import ModelSource, inside, load_bin
from mergekit.io.safetensors_file import SafetensorsReader, TensorInfo, read_header, shown
from mergekit.refs import ModelReference

if TYPE_CHECKING:
    import numpy as np
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# config fields of LoRA variants that plain LoRA arithmetic would get wrong
_VARIANTS = {"use_dora": "DoRA", "lora_bias": "LoRA with bias on B",
             "use_qalora": "QA-LoRA"}


@dataclass(frozen=True)
class LoraModule:
    """The LoRA factors of one weight: keys of A and B in the adapter file, its scaling,
    and whether the weight holds the transposed product (embeddings, fan_in_fan_out)."""

    a_key: str
    b_key: str
    scaling: float
    transposed: bool


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: the first pattern that matches the end of the module's
    name (at a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class Adapter:
    """A LoRA adapter folder: its config checked, its weights' names mapped to the model's
    weights (``modules``: weight name -> factors; ``full``: weight name -> the adapter's
    tensor that replaces it)."""

    def __init__(self, ref: ModelReference, folder: Path, fetch: Callable[[str], Path | None],
                 reader: SafetensorsReader) -> None:
        self.ref, self.folder, self._reader = ref, folder, reader
        where = f"adapter '{ref}'"
        config_path = fetch(ADAPTER_CONFIG)
        if config_path is None:
            raise usage_error(where, f"no {ADAPTER_CONFIG} in {folder}",
                              "point at a PEFT LoRA adapter folder")
        config_path = inside(folder, config_path)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise usage_error(str(config_path), f"cannot parse ({exc})",
                              "fix or re-download the file") from None
        if not isinstance(config, dict):
            raise usage_error(str(config_path), "is not a JSON object", "fix the file")
        self.config = config
        kind = config.get("peft_type")
        if kind != "LORA":
            raise usage_error(where, f"is a {kind or 'unknown'} adapter (peft_type); only "
                              "LoRA adapters (peft_type LORA) can be merged",
                              "merge it into its model with peft first")
        for key, name in _VARIANTS.items():
            if config.get(key):
                raise usage_error(where, f"is a {name} adapter ({key}: true); only plain LoRA "
                                  "can be merged", "merge it into its model with peft first")
        self.files = [ADAPTER_CONFIG]
        self._bin: dict[str, torch.Tensor] | None = None
        self._header: dict[str, TensorInfo] = {}
        for name in ADAPTER_WEIGHTS:
            path = fetch(name)
            if path is not None:
                self.weights_path = inside(folder, path)
                self.files.append(name)
                break
        else:
            raise usage_error(where, f"no adapter_model.safetensors or adapter_model.bin in "
                              f"{folder}", "point at a PEFT LoRA adapter folder")
        keys = self._keys()
        self._factors: tuple[str, Any, Any] = ("", None, None)
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}
        self._map(keys, where)

    # -- the adapter file ------------------------------------------------------------

    def _keys(self) -> list[str]:
        if self.weights_path.name.endswith(".bin"):
            self._bin = load_bin(self.weights_path)
            return list(self._bin)
        self._header = read_header(self.weights_path)
        return list(self._header)

    def array(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A tensor of the adapter file as float32 numpy values."""
        if self._bin is not None:
            t = self._bin[key]
            t = t if rows is None else t[rows[0]:rows[1]]
            return t.float().numpy()
        info = self._header[key]
        if info.dtype not in NUMPY_CODES:  # e.g. float64 factors
            import numpy as np

            return self._reader.read(info, rows).float().numpy().astype(np.float32)
        return to_float32(self._reader.read_array(info, rows), info.dtype)

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype code, shape) of a tensor of the adapter file."""
        if self._bin is not None:
            from mergekit.io.dtypes import st_code

            t = self._bin[key]
            return st_code(t.dtype), tuple(t.shape)
        return self._header[key].dtype, self._header[key].shape

    # -- keys to weights -------------------------------------------------------------------

    def _map(self, keys: list[str], where: str) -> None:
        config = self.config
        r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
        ranks = config.get("rank_pattern") or {}
        alphas = config.get("alpha_pattern") or {}
        rslora, fan = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
        factors: dict[str, dict[str, str]] = {}
        for key in keys:
            name = key.removeprefix(_PREFIX)
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            # peft saves a targeted embedding's (or head's) own weight as its base layer
            name = name.replace(".base_layer.", ".")
            match = re.match(r"(.+)\.(lora_A|lora_B)\.(?:[^.]+\.)?weight$", name) or re.match(
                r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name)
            if match is None:
                if "lora_" in name.rsplit(".", 1)[-1] or ".lora_" in name:
                    raise usage_error(where, f"tensor {shown(key)} is not part of plain LoRA",
                                      "only lora_A/lora_B factors and full tensors are read")
                self.full[name] = key
                continue
            module, part = match.groups()
            factors.setdefault(module, {})[part.replace("embedding_", "")] = key
        for module, parts in factors.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise usage_error(where, f"module {shown(module)} has {', '.join(parts)} only",
                                  "the adapter file is incomplete")
            r = _pattern_value(ranks, module, r_default)
            alpha = _pattern_value(alphas, module, alpha_default)
            rank = self.info(parts["lora_A"])[1][0]
            if rank != r:
                raise usage_error(where, f"module {shown(module)} has rank {rank}, the config "
                                  f"says {r}", "the adapter's config and weights disagree")
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            embedding = "lora_embedding_A" in parts["lora_A"]
            self.modules[f"{module}.weight"] = LoraModule(
                parts["lora_A"], parts["lora_B"], scaling, embedding or fan)

    def delta(self, name: str, rows: tuple[int, int] | None, shape: tuple[int, ...]
              ) -> np.ndarray:
        """Rows of scaling * B @ A as the weight ``name`` (of ``shape``) holds it."""
        m = self.modules[name]
        start, end = rows if rows is not None else (0, shape[0])
        if self._factors[0] != name:  # a weight's row chunks come one after another
            # B of a head is vocabulary x rank: only its rows for the chunk are read
            self._factors = (name, self.array(m.a_key),
                             self.array(m.b_key) if m.transposed else None)
        _, a, b = self._factors
        if m.transposed:  # the weight holds (B @ A)^T: its rows are A's columns
            out = a[:, start:end].T @ b.T
        else:
            out = self.array(m.b_key, (start, end)) @ a
        out *= m.scaling
        if tuple(out.shape[1:]) != tuple(shape[1:]) or (
                rows is None and out.shape[0] != shape[0]):
            raise merge_failure(f"adapter '{self.ref}'", f"{shown(name)}: B @ A has shape "
                                f"{list(out.shape)}, the weight {list(shape)}",
                                "the adapter was trained for another model")
        return out


class AdaptedModel(ModelSource):
    """A model read through a LoRA adapter: the model's files, headers and config, with
    adapted weights computed on read (``Adapter``)."""

    def __init__(self, model: ModelSource, adapter: Adapter, ref: ModelReference) -> None:
        self.__dict__.update(model.__dict__)  # shares the model's reader, headers, config
        self.ref = ref
        self.model = model
        self.adapter = adapter
        self.weight_map = dict(model.weight_map)
        for name in adapter.full:
            self.weight_map.setdefault(name, adapter.weights_path.name)
        missing = [n for n in list(adapter.modules) + list(adapter.full)
                   if n not in model.weight_map]
        if missing:
            raise usage_error(f"adapter '{adapter.ref}'", f"adapts {shown(missing[0])}, which "
                              f"model '{model.ref}' does not have" + (
                                  f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                              "apply the adapter to the model it was trained on")

    def adapted(self, name: str) -> bool:
        return name in self.adapter.modules or name in self.adapter.full

    def info(self, name: str) -> TensorInfo:
        if name in self.adapter.full:
            code, shape = self.adapter.info(self.adapter.full[name])
            from mergekit.io.dtypes import itemsize

            n = math.prod(shape) * itemsize(code)
            return TensorInfo(name, code, shape, self.adapter.weights_path, 0, n)
        return self.model.info(name)

    def is_safetensors(self, name: str) -> bool:
        if name in self.adapter.full:
            return self.adapter._bin is None
        return self.model.is_safetensors(name)

    def prefetch(self, name: str) -> None:
        if not self.adapted(name):
            self.model.prefetch(name)

    def _values(self, name: str, rows: tuple[int, int] | None) -> tuple[np.ndarray, str]:
        """The adapted rows as float32 values, and the stored dtype to narrow them to."""
        info = self.info(name)
        if name in self.adapter.full:  # replaced by the adapter's tensor
            base = self.adapter.array(self.adapter.full[name], rows).copy()
        elif self.model.is_safetensors(name) and info.dtype in NUMPY_CODES:
            # read_array reads into memory of its own: adding in place is safe
            base = to_float32(self.model.read_array(name, rows), info.dtype)
        else:
            base = self.model.read(name, rows).float().numpy().copy()
        if name in self.adapter.modules:
            base += self.adapter.delta(name, rows, info.shape)
        return base, info.dtype

    def read_array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        if not self.adapted(name):
            return self.model.read_array(name, rows)
        values, code = self._values(name, rows)
        return from_float32(values, code, False)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if not self.adapted(name):
            return self.model.read(name, rows)
        import torch

        values, code = self._values(name, rows)
        if code in NUMPY_CODES:
            out = from_float32(values, code, False)
            t = torch.from_numpy(out)
            return t.view(torch.bfloat16) if code == "BF16" else t
        return torch.from_numpy(values).to(torch_dtype(code))


def open_adapter(ref: ModelReference, reader: SafetensorsReader,
                 cache_dir: str | None) -> Adapter:
    """The adapter of a local folder or of a hub repo (config first, then its weights)."""
    if ref.is_local and ref.revision is None:
        folder = Path(ref.path)

        def fetch(filename: str) -> Path | None:
            p = folder / filename
            return p if p.is_file() else None

        return Adapter(ref, folder, fetch, reader)
    from mergekit.io import hub

    folder = hub.fetch_small_files(ref, cache_dir)

    def fetch_hub(filename: str) -> Path | None:
        local = folder / filename
        if local.is_file():
            return local
        return hub.fetch_file(ref, filename, cache_dir)

    return Adapter(ref, folder, fetch_hub, reader)


def open_input(ref: ModelReference, reader: SafetensorsReader,
               cache_dir: str | None) -> ModelSource:
    """A recipe's model: the model itself, or read through its adapter (``model+adapter``)."""
    from mergekit.io.model import open_model

    model = open_model(ref.model, reader, cache_dir)
    if ref.lora is None:
        return model
    return AdaptedModel(model, open_adapter(ref.lora, reader, cache_dir), ref)
