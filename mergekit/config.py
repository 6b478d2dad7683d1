"""The recipe: pydantic models for the YAML a user writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mergekit.errors import MergeError, usage_error
from mergekit.refs import ModelReference, parse_model_reference

Scalar = float | int | bool | str
Gradient = tuple[float, ...]


class Conditional(BaseModel):
    """One ``{filter, value}`` entry: applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = Field(None, description="substring of the tensor name; none matches all")
    value: Scalar | Gradient = Field(description="a scalar, or a gradient (list of numbers)")


def _parse_value(raw: Any) -> Scalar | Gradient:
    if isinstance(raw, bool | int | float | str):
        return raw
    if isinstance(raw, list | tuple):
        if not raw:
            raise ValueError("a gradient needs at least one number")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            raise ValueError(f"a gradient is a list of numbers, got {raw!r}")
        return tuple(float(v) for v in raw)
    raise ValueError(f"expected a number, a list of numbers or {{filter, value}}, got {raw!r}")


def _parse_conditional(raw: Any) -> Conditional:
    if not isinstance(raw, dict):
        raise ValueError(f"expected {{filter, value}}, got {raw!r}")
    unknown = set(raw) - {"filter", "value"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in a {{filter, value}} entry")
    if "value" not in raw:
        raise ValueError("a {filter, value} entry needs a 'value'")
    flt = raw.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"a filter is a string, got {flt!r}")
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
    layer_range: tuple[int, int] = Field(
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


class MergeConfiguration(_Recipe):
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
        None, description="'base' or a model reference: whose tokenizer to copy"
    )
    tokenizer: dict[str, Any] | None = Field(None, description="not supported yet")
    chat_template: str | None = Field(
        None, description="a built-in template name or a literal Jinja template"
    )

    @model_validator(mode="after")
    def _check(self) -> MergeConfiguration:
        from mergekit.recipe_checks import check_recipe

        check_recipe(self)
        return self

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

    def to_yaml(self) -> str:
        return dump_yaml(recipe_to_plain(self))


def recipe_to_plain(config: MergeConfiguration) -> dict[str, Any]:
    """The recipe as plain YAML-ready data (references back to strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, ModelReference):
            return str(v)
        if isinstance(v, Conditional):
            if v.filter is None:  # inside a list of entries it must stay an entry
                return {"value": plain(v.value)}
            return {"filter": v.filter, "value": plain(v.value)}
        if isinstance(v, tuple) and v and all(isinstance(c, Conditional) for c in v):
            if len(v) == 1 and v[0].filter is None:
                return plain(v[0].value)
            return [plain(c) for c in v]
        if isinstance(v, BaseModel):
            return {k: plain(x) for k, x in v if x is not None}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


def dump_yaml(data: Any) -> str:
    """YAML as recipes are written by hand: lists of numbers inline (``[0, 16]``)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, items: list[Any]) -> Any:
        flow = all(isinstance(v, int | float | bool | str) for v in items) and all(
            not isinstance(v, str) for v in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False)


def yaml_location(loc: tuple[Any, ...]) -> str:
    """('slices', 1, 'sources', 0, 'layer_range') -> 'slices[1].sources[0].layer_range'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{part}"
        else:
            out = str(part)
    return out


def _error_from_validation(exc: ValidationError, source: str) -> MergeError:
    lines = []
    for err in exc.errors():
        # drop pydantic's internal step names (union members, function-before, ...)
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or "[" not in str(p))
        msg = err["msg"].removeprefix("Value error, ")
        where = yaml_location(loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling and indentation"
        elif err["type"] == "missing":
            msg = "required field is missing"
        sub = re.match(r"^([A-Za-z_][\w.\[\]]*): ", msg)
        if where and sub:  # a validator named a field below the failing node
            where, msg = f"{where}.{sub.group(1)}", msg[sub.end():]
        lines.append(f"{where}: {msg}" if where else msg)
    return usage_error(source, "; ".join(dict.fromkeys(lines)))


def parse_config(data: Any, source: str = "recipe") -> MergeConfiguration:
    if not isinstance(data, dict):
        raise usage_error(source, "the recipe must be a YAML mapping", "see examples/")
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        raise _error_from_validation(exc, source) from None


def read_recipe(path: str | Path) -> Any:
    """The recipe file's YAML data; unreadable or malformed files are usage errors."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise usage_error(str(path), f"cannot read the recipe ({exc.strerror})",
                          "check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise usage_error(where, f"malformed YAML ({problem})", "fix the syntax") from None


def load_config(path: str | Path) -> MergeConfiguration:
    return parse_config(read_recipe(path), str(path))
