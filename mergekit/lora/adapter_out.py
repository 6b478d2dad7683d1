"""The files of a peft LoRA adapter: adapter_config.json, adapter_model.safetensors and an
optional README.md, with every module's scaling exactly 1 (lora_alpha = r, per module)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergekit.io.dtypes import NAME_TO_ST, from_float32
from mergekit.io.writer import ShardEntry, ShardWriter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
FILE_NAMES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD)
# peft's prefix for a wrapped model's state-dict keys (PeftModel.base_model.model)
KEY_PREFIX = "base_model.model."
TARGET_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _Factors:
    a: np.ndarray  # stored bytes in the target dtype; (r, in) or (r, num_embeddings)
    b: np.ndarray  # (out, r) or (embedding_dim, r)
    embedding: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]


class AdapterOutput:
    """Collects LoRA factors and full tensors, then writes them as an adapter of
    ``base_model``. Factors are kept converted to ``target_dtype`` (small); full tensors too,
    so a replaced embedding costs its stored size until ``write``."""

    def __init__(self, base_model: str, target_dtype: str = "float32") -> None:
        if target_dtype not in TARGET_DTYPES:
            raise ValueError(f"AdapterOutput: dtype {target_dtype!r} is not one of "
                             f"{', '.join(TARGET_DTYPES)}")
        self.base_model = base_model
        self._code = NAME_TO_ST[target_dtype]
        self._factors: dict[str, _Factors] = {}
        self._full: dict[str, np.ndarray] = {}

    def add_linear(self, module: str, a: np.ndarray, b: np.ndarray) -> None:
        """A linear layer's delta ``b @ a``: ``a`` (r, in), ``b`` (out, r); rank 0 is left out."""
        self._add(module, a, b, embedding=False)

    def add_embedding(self, module: str, a: np.ndarray, b: np.ndarray) -> None:
        """An embedding's delta ``(b @ a).T`` (num_embeddings, embedding_dim), as peft stores
        it: ``a`` (r, num_embeddings), ``b`` (embedding_dim, r); rank 0 is left out."""
        self._add(module, a, b, embedding=True)

    def add_full(self, name: str, array: np.ndarray) -> None:
        """A weight ``name`` (e.g. ``model.norm.weight``) replaced whole: its module goes into
        ``modules_to_save``."""
        if name in self._full:
            raise ValueError(f"AdapterOutput: {name} added twice")
        self._full[name] = self._stored(array)

    def _add(self, module: str, a: np.ndarray, b: np.ndarray, embedding: bool) -> None:
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"AdapterOutput: {module}: factors of shapes {a.shape} and "
                             f"{b.shape} do not multiply as b @ a")
        if module in self._factors:
            raise ValueError(f"AdapterOutput: {module} added twice")
        if a.shape[0] > 0:
            self._factors[module] = _Factors(self._stored(a), self._stored(b), embedding)

    def _stored(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(from_float32(np.asarray(x, np.float32), self._code,
                                                 finite=False))

    @property
    def ranks(self) -> dict[str, int]:
        """Each LoRA module's rank."""
        return {m: f.rank for m, f in self._factors.items()}

    @property
    def modules_to_save(self) -> list[str]:
        return sorted({name.rpartition(".")[0] for name in self._full})

    def config(self) -> dict[str, object]:
        """adapter_config.json. r and lora_alpha are the largest rank; other ranks are in
        rank_pattern and alpha_pattern with alpha = r, so that no module is scaled. Modules
        are named in full: a last part such as ``q_proj`` would target every layer's."""
        ranks = self.ranks
        top = max(ranks.values(), default=1)
        others = {m: r for m, r in sorted(ranks.items()) if r != top}
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": top,
            "lora_alpha": top,
            "rank_pattern": others,
            "alpha_pattern": dict(others),
            "target_modules": sorted(ranks),
            "modules_to_save": self.modules_to_save or None,
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
            "init_lora_weights": True,
        }

    def write(self, folder: Path, card: str | None = None) -> None:
        """Write the adapter's files into ``folder`` (which exists)."""
        lora = set(self._factors)
        clash = sorted(m for m in self.modules_to_save if m in lora)
        if clash:
            raise ValueError(f"AdapterOutput: {', '.join(clash)} both a LoRA module and "
                             "replaced whole; peft takes one or the other")
        tensors: list[tuple[str, np.ndarray]] = []
        for module, f in sorted(self._factors.items()):
            if f.embedding:
                tensors += [(f"{KEY_PREFIX}{module}.lora_embedding_A", f.a),
                            (f"{KEY_PREFIX}{module}.lora_embedding_B", f.b)]
            else:
                tensors += [(f"{KEY_PREFIX}{module}.lora_A.weight", f.a),
                            (f"{KEY_PREFIX}{module}.lora_B.weight", f.b)]
        tensors += [(KEY_PREFIX + name, x) for name, x in sorted(self._full.items())]
        entries = [ShardEntry(name, self._code, tuple(x.shape)) for name, x in tensors]
        writer = ShardWriter(folder / ADAPTER_WEIGHTS, entries)
        try:
            for name, x in tensors:
                writer.add(name, x, self._code)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2) + "\n")
        if card is not None:
            (folder / CARD).write_text(card)
