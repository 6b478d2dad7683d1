"""The recipe's fields: pydantic models of the YAML a user writes, with the checks that
need no method registry (``config.MergeConfiguration`` adds those that do)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from mergekit.recipe_text import short_repr, yaml_key
from mergekit.refs import ModelReference, parse_model_reference, reference_from_mapping

Scalar = float | int | bool | str
Gradient = tuple[float, ...]

class Conditional(BaseModel):
    """One ``{filter, value}`` entry: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = Field(None, description="substring of the tensor name; none matches all")
    value: Scalar | Gradient = Field(description="a scalar, or a gradient (list of numbers)")


# The merge math is float32: past FLOAT32_MAX a value overflows to inf (every output value
# NaN or inf), below FLOAT32_TINY it rounds to 0 or keeps a few bits (weights all that
# small normalise to zeros, not to their average).
FLOAT32_MAX = (2 - 2**-23) * 2.0**127
FLOAT32_TINY = 2.0**-126


def float32_error(v: int | float) -> str | None:
    """Why the number ``v`` cannot be a float32 parameter value, or None."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} is not a finite number; give a number"
    try:
        shown = repr(v) if isinstance(v, float) else f"{v:.6g}"
    except OverflowError:  # an integer past float64
        shown = short_repr(v)
    if abs(v) > FLOAT32_MAX:
        return (f"{shown} does not fit in float32 (largest magnitude {FLOAT32_MAX:.4g}); "
                "give a smaller number")
    if v and abs(v) < FLOAT32_TINY:
        return (f"{shown} is too small for float32 (below {FLOAT32_TINY:.4g} it rounds to 0 "
                "or loses precision); give 0 or a larger magnitude")
    return None


def _number(v: Any) -> Any:
    if isinstance(v, int | float) and not isinstance(v, bool):
        problem = float32_error(v)
        if problem:
            raise ValueError(problem)
    return v


def _parse_value(raw: Any) -> Scalar | Gradient:
    if isinstance(raw, bool | int | float | str):
        return _number(raw)
    if isinstance(raw, list | tuple):
        if not raw:
            raise ValueError("a gradient needs at least one number")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            raise ValueError(f"a gradient is a list of numbers, got {short_repr(raw)}")
        return tuple(float(_number(v)) for v in raw)
    raise ValueError(
        f"expected a number, a list of numbers or {{filter, value}}, got {short_repr(raw)}")


def _parse_conditional(raw: Any) -> Conditional:
    if not isinstance(raw, dict):
        raise ValueError(f"expected {{filter, value}}, got {short_repr(raw)}")
    unknown = set(raw) - {"filter", "value"}
    if unknown:
        listing = ", ".join(sorted(yaml_key(k) for k in unknown))
        raise ValueError(f"unknown key(s) {listing} in a {{filter, value}} entry; "
                         "an entry has only 'filter' and 'value'")
    if "value" not in raw:
        raise ValueError("a {filter, value} entry needs a 'value'")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"a filter is a string, got {short_repr(flt)}")
    return Conditional(filter=flt, value=_parse_value(raw["value"]))


def _parse_setting(raw: Any) -> tuple[Conditional, ...]:
    """Normalise a parameter setting to a tuple of conditionals, tried in order."""
    if isinstance(raw, tuple) and all(isinstance(c, Conditional) for c in raw):
        return raw
    if isinstance(raw, dict):
        return (_parse_conditional(raw),)
    if isinstance(raw, list) and raw and all(isinstance(v, dict) for v in raw):
        return tuple(_parse_conditional(v) for v in raw)
    return (Conditional(filter=None, value=_parse_value(raw)),)


ParameterSetting = Annotated[tuple[Conditional, ...], BeforeValidator(_parse_setting)]
Parameters = dict[str, ParameterSetting]


def _parse_ref(raw: Any) -> ModelReference:
    if isinstance(raw, ModelReference):
        return raw
    if isinstance(raw, dict):
        return reference_from_mapping(raw)
    return parse_model_reference(raw)


ModelRef = Annotated[ModelReference, BeforeValidator(_parse_ref)]
DType = Literal["float32", "float16", "bfloat16"]


class _Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class InputModelDefinition(_Recipe):
    model: ModelRef = Field(description="local folder, hub id, or hub id@revision")
    parameters: Parameters | None = Field(None, description="parameters for this model")


class InputSliceDefinition(_Recipe):
    model: ModelRef = Field(description="local folder, hub id, or hub id@revision")
    # strict: YAML's true, 2.0 and '2' are mistakes, not layer numbers
    layer_range: tuple[StrictInt, StrictInt] = Field(
        description="[start, end) layers taken from the model; an empty range [n, n] in the "
        "first or last slice adds no layers and only picks the embeddings or the head")
    parameters: Parameters | None = Field(None, description="parameters for this source")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"{list(v)} must be [start, end) with 0 <= start <= end")
        return v


class OutputSliceDefinition(_Recipe):
    sources: list[InputSliceDefinition] = Field(
        min_length=1, description="models (with layer ranges) merged into this slice"
    )
    base_model: ModelRef | None = Field(None, description="base model for this slice")
    parameters: Parameters | None = Field(None, description="parameters for this slice")

    @model_validator(mode="after")
    def _same_length(self) -> OutputSliceDefinition:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "sources: all sources of a slice must span the same number of layers, got "
                + ", ".join(str(list(s.layer_range)) for s in self.sources)
            )
        return self


class ModelTokenSource(_Recipe):
    """A given row of a given model: ``{kind: model_token, model, token | token_id}``."""

    kind: Literal["model_token"]
    model: ModelRef = Field(description="a model of the recipe")
    token: str | None = Field(None, description="the token's text in that model's tokenizer")
    token_id: StrictInt | None = Field(None, description="or the row number in that model")

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token or token_id")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id: {self.token_id} is negative; give a row number")
        return self


class ZeroSource(_Recipe):
    """A row of zeros: ``{kind: zero}``."""

    kind: Literal["zero"]


class TokenSource(_Recipe):
    """Where a token's row comes from, for the models that lack it (or every model, with
    ``force``)."""

    source: ModelRef | ModelTokenSource | ZeroSource = Field(
        description="a model (its row for the token), {kind: model_token, model, token | "
        "token_id} or {kind: zero}")
    force: bool = Field(False, description="use this row for every model, not only those "
                        "that lack the token")

    @field_validator("source", mode="before")
    @classmethod
    def _which(cls, raw: Any) -> Any:
        # a mapping is read as the kind it names, so that errors name its fields
        if isinstance(raw, dict) and raw.get("kind") == "zero":
            return ZeroSource.model_validate(raw)
        if isinstance(raw, dict) and raw.get("kind") != "model_token":
            raise ValueError(f"kind: {short_repr(raw.get('kind'))} is neither model_token nor "
                             "zero; give {kind: model_token, model, token} or {kind: zero}")
        if isinstance(raw, dict):
            return ModelTokenSource.model_validate(raw)
        if isinstance(raw, str):
            return parse_model_reference(raw)
        raise ValueError("give a model, {kind: model_token, model, token} or {kind: zero}")


class TokenizerBlock(_Recipe):
    """The ``tokenizer:`` block: the output's vocabulary and where each row comes from."""

    source: str = Field("union", description="'union', 'base' or a model reference")
    tokens: dict[str, TokenSource] | None = Field(
        None, description="token text -> {source, force}")
    pad_to_multiple_of: StrictInt | None = Field(
        None, description="pad the vocabulary to a multiple of this many rows")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v not in ("union", "base"):
            parse_model_reference(v)
        return v

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{v} is not a positive number of rows; give e.g. 64")
        return v


class OutputBlock(_Recipe):
    """The ``output:`` block: what the merge is written as."""

    lora_rank: StrictInt | None = Field(
        None, description="write the merge as a LoRA adapter of base_model, of at most this "
        "rank (as --lora-out)")

    @field_validator("lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"{v} is not a rank; give 1 or more")
        return v


class RecipeFields(_Recipe):
    """The recipe's top-level fields, checked only field by field; ``MergeConfiguration``
    adds the checks that need the method registry."""

    merge_method: str = Field(description="the merge method (see the method list)")
    models: list[InputModelDefinition] | None = Field(
        None, description="whole models to merge (or use slices)"
    )
    slices: list[OutputSliceDefinition] | None = Field(
        None, description="output layer slices, each merged from sources"
    )
    base_model: ModelRef | None = Field(None, description="the base model, for methods using one")
    parameters: Parameters | None = Field(None, description="parameters for every tensor")
    input_model_parameters: dict[str, Parameters] | None = Field(
        None, description="per-model parameters keyed by model reference"
    )
    dtype: DType | None = Field(None, description="output dtype unless out_dtype is set")
    out_dtype: DType | None = Field(None, description="dtype of the saved tensors")
    tokenizer_source: str | None = Field(
        None, description="'union', 'base' or a model reference: the output's vocabulary "
        "(short for tokenizer: {source: ...})"
    )
    tokenizer: TokenizerBlock | None = Field(
        None, description="the output's vocabulary: source, tokens, pad_to_multiple_of")
    output: OutputBlock | None = Field(
        None, description="what the merge is written as: {lora_rank: R} for an adapter")
    chat_template: str | None = Field(
        None, description="a built-in template name or a literal Jinja template"
    )

    @property
    def vocabulary_source(self) -> str | None:
        """'union', 'base', a model reference, or None (neither field is set)."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    def referenced_models(self) -> list[ModelReference]:
        """Every model the recipe names, in first-seen order."""
        refs: list[ModelReference] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs.extend(src.model for src in s.sources)
            if s.base_model:
                refs.append(s.base_model)
        return list(dict.fromkeys(refs))

