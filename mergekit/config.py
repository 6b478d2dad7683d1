"""The recipe: ``MergeConfiguration`` (the fields of ``recipe_fields.py``, checked against
the method registry by ``recipe_checks.py``), read from YAML, with its errors named by
their YAML path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

from mergekit.errors import MergeError, usage_error
from mergekit.recipe_checks import check_recipe
from mergekit.recipe_fields import (
    Conditional,
    InputModelDefinition,
    InputSliceDefinition,
    OutputSliceDefinition,
    Parameters,
    RecipeFields,
)
from mergekit.recipe_text import yaml_key, yaml_location
from mergekit.refs import ModelReference

# the recipe's parts, for ``from mergekit.config import ...``
__all__ = [
    "Conditional",
    "InputModelDefinition",
    "InputSliceDefinition",
    "MergeConfiguration",
    "OutputSliceDefinition",
    "Parameters",
    "dump_yaml",
    "load_config",
    "parse_config",
    "read_recipe",
    "recipe_to_plain",
]


class MergeConfiguration(RecipeFields):
    """A recipe: its fields, also checked against the method registry (methods, parameters,
    base model, model counts)."""

    @model_validator(mode="after")
    def _check(self) -> MergeConfiguration:
        check_recipe(self)
        return self

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
