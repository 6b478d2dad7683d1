"""The recipe: pydantic models for the YAML a user writes."""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from mergekit.errors import MergeError, usage_error
from mergekit.refs import ModelReference, parse_model_reference

Scalar = float | int | bool | str
Gradient = tuple[float, ...]


def short_repr(value: Any) -> str:
    """A one-line repr of user data, cut short: recipes may hold huge or aliased values."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 2, 6, 6, 4
    short.maxset = short.maxfrozenset = 4
    short.maxstring = short.maxother = 60
    text = short.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


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

    from mergekit.recipe_yaml import add_exponent_floats

    class Dumper(yaml.SafeDumper):
        pass

    add_exponent_floats(Dumper)  # a string such as '1e5' is read back as a string

    def represent_list(dumper: yaml.SafeDumper, items: list[Any]) -> Any:
        flow = all(isinstance(v, int | float | bool | str) for v in items) and all(
            not isinstance(v, str) for v in items)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False)


def yaml_key(key: Any) -> str:
    """A mapping key as a location names it: quoted (and cut short) where it is empty, long,
    or has line breaks or other unprintable characters."""
    text = key if isinstance(key, str) else str(key)
    plain = text and text.isprintable() and text.strip() == text and len(text) <= 200
    return text if plain else short_repr(text)


def yaml_location(loc: tuple[Any, ...]) -> str:
    """('slices', 1, 'sources', 0, 'layer_range') -> 'slices[1].sources[0].layer_range'."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif out:
            out += f".{yaml_key(part)}"
        else:
            out = yaml_key(part)
    return out


def _user_location(data: Any, loc: tuple[Any, ...]) -> tuple[str, bool]:
    """The YAML path of a pydantic error location, walking the recipe data alongside it.

    Parts the data has are kept (a dict's int key is a key, not an index); pydantic's step
    names (union members, ``function-before[...]``, ``[key]``) are dropped. Returns the path
    and whether the error is about a mapping key itself.
    """
    out, node, about_key = "", data, False
    for part in loc:
        if isinstance(node, dict) and part in node:
            out += f".{yaml_key(part)}" if out else yaml_key(part)
            node = node[part]
        elif (isinstance(node, list | tuple) and isinstance(part, int)
              and not isinstance(part, bool) and -len(node) <= part < len(node)):
            out += f"[{part}]"
            node = node[part]
        elif part == "[key]":
            about_key = True
        elif isinstance(part, str) and "[" in part:
            continue  # pydantic's own step name
        else:  # a missing field or item: named, but there is nothing below it
            named = yaml_location((part,))
            out += f".{named}" if out and not named.startswith("[") else named
            node = None
    return out, about_key


_MAX_PROBLEMS = 8


def _error_from_validation(exc: ValidationError, data: Any, source: str) -> MergeError:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        where, about_key = _user_location(data, tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling and indentation"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif about_key or err["type"] == "invalid_key":
            msg = "keys must be strings; quote the key"
        sub = re.match(r"^([A-Za-z_][\w.\[\]]*): ", msg)
        if where and sub:  # a validator named a field below the failing node
            where, msg = f"{where}.{sub.group(1)}", msg[sub.end():]
        lines.append(f"{where}: {msg}" if where else msg)
    lines = list(dict.fromkeys(lines))
    if len(lines) > _MAX_PROBLEMS:  # one line stays readable
        lines = [*lines[:_MAX_PROBLEMS], f"and {len(lines) - _MAX_PROBLEMS} more problem(s)"]
    return usage_error(source, "; ".join(lines))


def parse_config(data: Any, source: str = "recipe") -> MergeConfiguration:
    if not isinstance(data, dict):
        raise usage_error(source, "the recipe must be a YAML mapping", "see examples/")
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        raise _error_from_validation(exc, data, source) from None


def read_recipe(path: str | Path) -> Any:
    """The recipe file's YAML data; unreadable or malformed files are usage errors."""
    from mergekit.recipe_yaml import load_yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise usage_error(str(path), f"cannot read the recipe ({exc.strerror})",
                          "check the path") from None
    except UnicodeDecodeError as exc:
        raise usage_error(str(path), f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start})", "save the recipe as UTF-8 YAML") from None
    return load_yaml(text, str(path))


def load_config(path: str | Path) -> MergeConfiguration:
    return parse_config(read_recipe(path), str(path))
