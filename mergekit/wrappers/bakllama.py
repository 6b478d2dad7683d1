"""bakllama layer-recombination files -> a passthrough merge recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Output projections of attention and MLP blocks, by naming convention (Llama-style,
# GPT-2, GPT-NeoX): the tensors a slice's `scale` multiplies.
SCALED_TENSORS = ("self_attn.o_proj", "mlp.down_proj", "attn.c_proj", "mlp.c_proj",
                  "attention.dense", "mlp.dense_4h_to_h")


class LayerSlice(BaseModel):
    # strict: a quoted '2' or a true is a mistake in the file, not a number
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(description="model to take the layers from")
    start: int = Field(ge=0, description="first layer taken")
    end: int = Field(ge=0, description="layer after the last one taken (exclusive)")
    scale: float | None = Field(None, description="multiplies the slice's attention output "
                                "and MLP down projections")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float | None) -> float | None:
        from mergekit.recipe_fields import float32_error

        problem = None if v is None else float32_error(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _range(self) -> LayerSlice:
        if self.end <= self.start:
            raise ValueError(f"end {self.end} is not after start {self.start} (end is "
                             "exclusive)")
        return self


class BakllamaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer_slices: list[LayerSlice] = Field(min_length=1, description="the layers, in order")
    embedding_source: str | None = Field(None, description="model giving the embeddings "
                                         "(default: the first slice's)")
    lm_head_source: str | None = Field(None, description="model giving the final norm and "
                                       "output head (default: the last slice's)")


def _layer_slice(s: LayerSlice) -> dict[str, Any]:
    source: dict[str, Any] = {"model": s.model, "layer_range": [s.start, s.end]}
    if s.scale is not None:
        source["parameters"] = {"scale": [{"filter": name, "value": s.scale}
                                          for name in SCALED_TENSORS] + [{"value": 1.0}]}
    return {"sources": [source]}


def bakllama_recipe(cfg: BakllamaConfig, fp16: bool) -> dict[str, Any]:
    slices = [_layer_slice(s) for s in cfg.layer_slices]
    # An empty layer range adds no layers; as the first or last slice it only decides
    # where the embeddings, or the final norm and head, come from.
    first, last = cfg.layer_slices[0], cfg.layer_slices[-1]
    if cfg.embedding_source and cfg.embedding_source != first.model:
        slices.insert(0, {"sources": [{"model": cfg.embedding_source, "layer_range": [0, 0]}]})
    if cfg.lm_head_source and cfg.lm_head_source != last.model:
        slices.append({"sources": [{"model": cfg.lm_head_source, "layer_range": [0, 0]}]})
    recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if fp16:
        recipe["dtype"] = "float16"
    return recipe


def load_bakllama(path: Path, fp16: bool) -> dict[str, Any]:
    """Read a bakllama file; errors name the file and the field."""
    from pydantic import ValidationError

    from mergekit.config import read_recipe
    from mergekit.errors import usage_error
    from mergekit.recipe_text import yaml_location

    data = read_recipe(path)  # unreadable, non-UTF-8 or malformed files: one-line errors
    if not isinstance(data, dict):
        raise usage_error(str(path), f"expected a mapping with layer_slices, found "
                          f"{type(data).__name__}", "fix the bakllama file")
    try:
        cfg = BakllamaConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise usage_error(f"{path}: {yaml_location(err['loc'])}",
                          err["msg"].removeprefix("Value error, "),
                          "fix the bakllama file") from None
    return bakllama_recipe(cfg, fp16)
