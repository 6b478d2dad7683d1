"""Recipe checks that need the method registry; run when a recipe is validated.

Each check raises ValueError whose text starts with the YAML path of the field.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

from mergekit.errors import MergeError
from mergekit.recipe_text import short_repr, yaml_key
from mergekit.refs import ModelReference, parse_model_reference

if TYPE_CHECKING:
    from mergekit.methods.registry import Method, ParamSpec
    from mergekit.recipe_fields import Parameters, RecipeFields


def check_recipe(cfg: RecipeFields) -> None:
    from mergekit.methods.registry import get_method

    try:
        method = get_method(cfg.merge_method)
    except MergeError as exc:
        raise ValueError(str(exc)) from None

    if (cfg.models is None) == (cfg.slices is None):
        raise ValueError("give exactly one of 'models' or 'slices'")
    if cfg.models is not None and not cfg.models:
        raise ValueError("models: the list is empty")
    if cfg.slices is not None and not cfg.slices:
        raise ValueError("slices: the list is empty")
    if cfg.tokenizer is not None and cfg.tokenizer_source is not None:
        raise ValueError("tokenizer_source: set it or the tokenizer block's source, not both")
    if cfg.tokenizer_source not in (None, "base", "union"):
        try:
            parse_model_reference(cfg.tokenizer_source)
        except ValueError as exc:
            raise ValueError(f"tokenizer_source: {exc}") from None
    if cfg.vocabulary_source == "base" and cfg.base_model is None:
        where = "tokenizer.source" if cfg.tokenizer is not None else "tokenizer_source"
        raise ValueError(f"{where}: 'base' needs a base_model; set one or name a model")
    _check_token_sources(cfg)

    check_chat_template(cfg.chat_template)
    _check_params(method, cfg.parameters, "parameters")
    referenced = {str(r) for r in cfg.referenced_models()}
    for key, params in (cfg.input_model_parameters or {}).items():
        where = f"input_model_parameters.{yaml_key(key)}"
        try:
            ref = parse_model_reference(key)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if str(ref) not in referenced:
            raise ValueError(
                f"{where}: not a model of this recipe; write the reference exactly as models, "
                "slices or base_model do"
            )
        _check_params(method, params, where)

    if cfg.models is not None:
        for i, m in enumerate(cfg.models):
            _check_params(method, m.parameters, f"models[{i}].parameters")
        _check_base_and_count(
            method, cfg.base_model, [m.model for m in cfg.models], "models", "base_model"
        )
    else:
        _check_empty_slices(cfg)
        for i, s in enumerate(cfg.slices or []):
            _check_params(method, s.parameters, f"slices[{i}].parameters")
            for j, src in enumerate(s.sources):
                _check_params(method, src.parameters, f"slices[{i}].sources[{j}].parameters")
            base = s.base_model or cfg.base_model
            _check_base_and_count(
                method, base, [src.model for src in s.sources], f"slices[{i}].sources",
                f"slices[{i}].base_model",
            )
            if base is not None and method.base != "unused":
                if base not in [src.model for src in s.sources]:
                    raise ValueError(
                        f"slices[{i}].sources: the base model {base} is not among the sources; "
                        "add it with a layer_range"
                    )


def _check_empty_slices(cfg: RecipeFields) -> None:
    slices = cfg.slices or []
    empty = [not any(src.layer_range[1] > src.layer_range[0] for src in s.sources)
             for s in slices]
    if all(empty):
        raise ValueError("slices: no slice takes any layer; give a layer_range [start, end) "
                         "with start < end")
    for i, is_empty in enumerate(empty):
        if is_empty and 0 < i < len(slices) - 1:
            r = list(slices[i].sources[0].layer_range)
            raise ValueError(
                f"slices[{i}].sources[0].layer_range: {r} is empty; an empty range only fits "
                "the first slice (to pick the embeddings) or the last (to pick the head)")


def _check_params(method: Method, params: Parameters | None, where: str) -> None:
    known = {p.name for p in method.params}
    for name, setting in (params or {}).items():
        if name not in known and name in other_methods_parameters(method):
            continue  # as mergekit 0.1.x: ignored, with a warning from the plan
        if name not in known:
            import difflib

            close = (difflib.get_close_matches(name, sorted(known), n=1)
                     or difflib.get_close_matches(name, sorted(other_methods_parameters(
                         method)), n=1))
            hint = f"did you mean {close[0]!r}? " if close else ""
            if close and close[0] not in known:
                hint += f"(ignored by '{method.name}') "
            raise ValueError(
                f"{where}.{yaml_key(name)}: '{method.name}' has no parameter "
                f"{short_repr(name)}; {hint or 'remove it '}"
                f"(its parameters: {', '.join(sorted(known)) or 'none'})"
            )
        spec = method.param(name)
        for cond in setting:
            problem = (_type_error(spec, cond.value)
                       or _bounds_error(method, spec, cond.value))
            if problem:
                raise ValueError(f"{where}.{yaml_key(name)}: {problem}")


def other_methods_parameters(method: Method) -> set[str]:
    """Parameter names that other methods take and ``method`` does not: a recipe that
    switched methods keeps them (a ``weight`` left on slerp's models)."""
    from mergekit.methods.registry import all_methods

    own = {p.name for p in method.params}
    return {p.name for m in all_methods().values() for p in m.params} - own


def _type_error(spec: ParamSpec, value: object) -> str | None:
    """Why ``value`` does not fit the parameter's type, or None. Nothing is coerced: a
    quoted '0.5' or a true where a number belongs is a mistake the recipe should show."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if spec.kind == "float":
        ok, expected = number or isinstance(value, tuple), "a number"
    elif spec.kind == "int":
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif spec.kind == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif spec.choices:
        ok = isinstance(value, str) and value in spec.choices
        expected = "one of: " + ", ".join(map(str, spec.choices))
    else:
        return None  # a type the recipe cannot write; the params model decides
    if ok:
        return None
    if isinstance(value, tuple):
        return f"a gradient (list of numbers) does not fit here; give {expected}"
    if spec.choices:
        return f"{short_repr(value)} is not a choice; give {expected}"
    if isinstance(value, float) and spec.kind == "int":
        if value.is_integer():
            return f"{value!r} is not written as a whole number; drop the decimal point"
        return f"{value!r} is not a whole number; give {expected}"
    if isinstance(value, bool):
        return f"{str(value).lower()} is a boolean; give {expected}"
    if isinstance(value, str):
        bare = value.strip().lower()
        fits = {"float": _is_number, "int": str.isdigit,
                "bool": lambda v: v in ("true", "false")}[spec.kind](bare)
        return (f"{short_repr(value)} is a string; give {expected}"
                + (", without quotes" if fits else ""))
    return f"{short_repr(value)} is a number; give {expected}"


def _bounds_error(method: Method, spec: ParamSpec, value: object) -> str | None:
    """Why a value (or a gradient anchor: values between anchors stay inside the bounds)
    is outside the bounds the params model declares for a whole-merge parameter, or None."""
    from pydantic import TypeAdapter, ValidationError

    info = method.params_model.model_fields[spec.attr]
    if spec.per_model or not info.metadata:
        return None
    adapter = TypeAdapter(Annotated[(info.annotation, *info.metadata)])
    for v in value if isinstance(value, tuple) else (value,):
        try:
            adapter.validate_python(v)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            return f"{short_repr(v)} is out of range: {msg[:1].lower()}{msg[1:]}"
    return None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_base_and_count(
    method: Method, base: object, refs: list, where: str, base_where: str
) -> None:
    if method.base == "required" and base is None:
        raise ValueError(f"{base_where}: '{method.name}' needs a base_model; set base_model")
    n = len([r for r in refs if method.base == "unused" or r != base])
    if n < method.min_models:
        raise ValueError(
            f"{where}: '{method.name}' needs at least {method.min_models} model(s) besides the "
            f"base, got {n}"
        )
    if method.max_models is not None and n > method.max_models:
        extra = " besides the base" if method.base != "unused" else ""
        raise ValueError(
            f"{where}: '{method.name}' takes at most {method.max_models} model(s){extra}, got {n}"
        )


def check_chat_template(value: str | None) -> None:
    from mergekit.chat_templates import BUILTIN_TEMPLATES, is_literal_template

    if value is None or value == "auto" or is_literal_template(value):
        return
    if value not in BUILTIN_TEMPLATES:
        raise ValueError(
            f"chat_template: unknown template {short_repr(value)}; use a Jinja template or one of: "
            f"auto, {', '.join(BUILTIN_TEMPLATES)}"
        )


def _check_token_sources(cfg: Any) -> None:
    """Every model a token source names is a model of the recipe."""
    if cfg.tokenizer is None or not cfg.tokenizer.tokens:
        return
    referenced = {str(r) for r in cfg.referenced_models()}
    source = cfg.tokenizer.source
    if source not in ("union", "base") and str(parse_model_reference(source)) not in referenced:
        raise ValueError(f"tokenizer.source: {source} is not a model of the recipe; "
                         "name one of its models, 'base' or 'union'")
    for token, spec in cfg.tokenizer.tokens.items():
        model = spec.source if isinstance(spec.source, ModelReference) else getattr(
            spec.source, "model", None)  # None: a row of zeros
        if model is not None and str(model) not in referenced:
            raise ValueError(f"tokenizer.tokens.{yaml_key(token)}.source: {model} is not a "
                             "model of the recipe; name one of its models")
