"""Options of a merge run that are not part of the recipe."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*$")
_FACTORS = {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3, "g": 1000**3}


def parse_size(text: str | int) -> int:
    """'5B' -> 5_000_000_000; suffixes k (thousand), M (million), B or G (billion)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; use bytes with an optional k/M/B suffix")
    value = int(float(m.group(1)) * _FACTORS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r}: the size must be positive")
    return value


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cuda: bool = Field(False, description="do the math on the GPU (same as device='cuda')")
    device: str | None = Field(None, description="torch device for the math, e.g. 'cuda:1'")
    out_shard_size: int = Field(5 * 1000**3, description="largest output shard, in bytes")
    copy_tokenizer: bool = Field(True, description="copy the tokenizer into the output")
    allow_crimes: bool = Field(False, description="allow merging different architectures")
    lazy_unpickle: bool = Field(False, description="accepted for compatibility; .bin files "
                                "are always memory-mapped when possible")
    random_seed: int | None = Field(None, description="seed for methods that draw at random")
    clone_tensors: bool = Field(False, description="accepted for compatibility; tensors are "
                                "never shared between outputs")
    trust_remote_code: bool = Field(False, description="accepted for compatibility; no "
                                    "effect: the merge never runs model code")
    transformers_cache: str | None = Field(None, description="hub cache folder to use")
    write_model_card: bool = Field(True, description="write README.md with the merge details")
    verbose: bool = Field(False, description="show tracebacks and details")
    quiet: bool = Field(False, description="no progress bar")
    dry_run: bool = Field(False, description="print the plan; read and write no weights")
    hash_inputs: bool = Field(False, description="record the sha256 of local input files in "
                              "the manifest (reads them once more)")
    strict_finite: bool = Field(False, description="fail on NaN or Inf in an input tensor "
                                "instead of warning")
    allow_nonfinite: bool = Field(False, description="write a merged tensor holding NaN or "
                                  "Inf its inputs lack, with a warning, instead of failing")
    overwrite: bool = Field(False, description="replace an earlier output in OUT made by a "
                            "different recipe or options")
    lora_out: int | None = Field(None, description="write the merge as a LoRA adapter of "
                                 "the base model, of at most this rank")
    lora_merge_cache: str | None = Field(None, description="accepted for compatibility; "
                                         "adapters are applied as weights are read")
    lora_merge_dtype: str | None = Field(None, description="accepted for compatibility; "
                                         "adapters are applied in float32")
    resume: bool = Field(True, description="keep the shards an interrupted run of the same "
                         "merge finished (False: start over)")

    @field_validator("out_shard_size", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        return parse_size(v)  # type: ignore[arg-type]

    @property
    def torch_device(self) -> str:
        if self.device:
            return self.device
        return "cuda" if self.cuda else "cpu"
