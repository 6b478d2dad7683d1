"""The registry of merge methods: name -> function, parameter model and base requirement.

A method is a pure function ``fn(tensors, base, params) -> tensor``:
``tensors`` are the non-base inputs as float32 tensors of one shape, ``base`` the base
model's tensor (or None), ``params`` an instance of the method's parameter model in which
per-model fields hold one value per entry of ``tensors``. It returns a float32 tensor.

A method registered with ``arrays`` computes with operators and methods that numpy
float32 arrays share with torch tensors (``*``, ``+=``, ``reshape``, ...), rounding every
operation alike (no fused multiply-add: ``out += x * w``, not ``out.add_(x, alpha=w)``), so
that numpy inputs give the bits torch inputs do: the engine runs CPU merges of such
methods on numpy and never loads torch (the numpy backend, ``backends.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, Strict
from pydantic.fields import FieldInfo

from mergekit.errors import usage_error


class _PerModel:
    """Marker: this parameter takes one value per input model."""

    def __repr__(self) -> str:
        return "per-model"


PER_MODEL = _PerModel()

# A per-model number: the recipe gives a scalar (or gradient) per model; the method
# receives a tuple with one float per input tensor (a list is taken too; its items strictly).
PerModelFloat = Annotated[tuple[Annotated[float, Strict()], ...], Strict(False), PER_MODEL]


@dataclass(frozen=True)
class UsualRange:
    """Marker: values of this parameter outside [low, high] are accepted, but do something
    else than the name suggests (``effect``); the plan warns at each place a recipe sets
    one, e.g. ``t: Annotated[float, UsualRange(0, 1, "slerp extrapolates past the models")]``.
    """

    low: float
    high: float
    effect: str


class MethodParams(BaseModel):
    """Base class of every method's parameter model."""

    # strict: no '0.5' or true taken as a number, no 1 as true (an int is a float still)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class PositionalParams(MethodParams):
    """Base class of the parameters of methods whose result for an element depends on its
    position in the whole tensor: the engine gives them the position of each row chunk,
    and the whole tensor's size."""

    offset: int = Field(
        0, description="set by the engine: flat index of the first element passed (row "
        "chunks), so results depend on the element, not on the chunking",
        json_schema_extra={"internal": True},
    )
    numel: int = Field(
        0, description="set by the engine: elements in the whole tensor (0: not known)",
        json_schema_extra={"internal": True},
    )


class RandomParams(PositionalParams):
    """Base class of the parameters of methods that draw at random."""

    seed: int = Field(
        0, description="set by the engine from --random-seed and the tensor name",
        json_schema_extra={"internal": True},
    )


def prepared() -> Any:
    """A params field that the method's prepare pass sets from the whole tensor (None
    until then): not a recipe parameter, and not listed by ``mergekit-methods``."""
    return Field(None, description="set by the prepare pass",
                 json_schema_extra={"internal": True})


def is_internal(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("internal"))


BaseUse = Literal["required", "optional", "unused"]
# How inputs of different shapes (vocabulary sizes) are brought to one shape:
# "min" crops all to the common smallest shape, "base" to the base model's shape.
ShapePolicy = Literal["min", "base"]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # the name a recipe uses (the alias where one is set)
    attr: str  # the attribute on the params model
    per_model: bool
    required: bool
    default: Any
    kind: str  # "float", "bool", "int", "str", ...
    description: str
    choices: tuple[Any, ...] = ()  # the allowed values of a Literal parameter
    usual_range: UsualRange | None = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    params_model: type[MethodParams]
    base: BaseUse
    shape_policy: ShapePolicy
    min_models: int
    max_models: int | None
    random: bool
    # True, or a test on the params: each output element depends only on the inputs' same
    # element, so the engine may run the method on row chunks of large tensors.
    elementwise: bool | Callable[[Any], bool] = False
    # prepare(chunks, params) -> params: whole-tensor statistics gathered from passes over
    # ``chunks()``, an iterable of (inputs, base) row chunks; the engine calls it before
    # running the method on chunks of the same tensor.
    prepare: Callable[[Any, Any], Any] | None = None
    # A test on the params: the method returns its one input unchanged, so the engine may
    # copy the tensor's bytes instead of running it in float32.
    copies: Callable[[Any], bool] | None = None
    # Wherever an input element is NaN or Inf, the result's element is too (sums with
    # finite weights, no masks or clamps): the engine checks each result instead of every
    # input, and looks at the inputs only when the result is not finite.
    keeps_nonfinite: bool = False
    # The prepare pass is light (slerp's dot products, bound by memory): over row chunks it
    # leaves one core to the output's writer, as merge passes do. Other prepare passes
    # (ties' selection, DARE's draws and sums) run on every core.
    light_prepare: bool = False
    # True, or a test on the params: the function (and prepare) take numpy float32 arrays
    # as well as torch tensors, with the same result bits, so CPU merges run it without
    # loading torch (see ``backends.py``).
    arrays: bool | Callable[[Any], bool] = False

    def runs_elementwise(self, params: MethodParams) -> bool:
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise

    def takes_arrays(self, params: MethodParams) -> bool:
        return self.arrays(params) if callable(self.arrays) else self.arrays

    def copies_input(self, params: MethodParams) -> bool:
        return self.copies is not None and self.copies(params)

    @property
    def display_name(self) -> str:
        doc = (self.fn.__doc__ or self.name).strip()
        return doc.splitlines()[0].strip()

    @property
    def reference(self) -> str:
        lines = [line.strip() for line in (self.fn.__doc__ or "").strip().splitlines()[1:]]
        return next((line for line in lines if line.startswith("http")), "")

    @property
    def params(self) -> list[ParamSpec]:
        return [
            _spec(attr, info)
            for attr, info in self.params_model.model_fields.items()
            if not is_internal(info)
        ]

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def make_params(self, values: dict[str, Any]) -> MethodParams:
        """Build the params instance from resolved values keyed by recipe name."""
        return self.params_model.model_validate(values)


def _spec(attr: str, info: FieldInfo) -> ParamSpec:
    per_model = any(isinstance(m, _PerModel) for m in info.metadata)
    annotation = info.annotation
    choices = get_args(annotation) if get_origin(annotation) is Literal else ()
    if per_model:
        kind = "float"
    elif annotation is bool:
        kind = "bool"
    elif annotation is int:
        kind = "int"
    elif annotation is float:
        kind = "float"
    elif choices:
        kind = type(choices[0]).__name__
    else:
        kind = getattr(annotation, "__name__", str(annotation))
    return ParamSpec(
        name=info.alias or attr,
        attr=attr,
        per_model=per_model,
        required=info.is_required(),
        default=None if info.is_required() else info.default,
        kind=kind,
        description=info.description or "",
        choices=choices,
        usual_range=next((m for m in info.metadata if isinstance(m, UsualRange)), None),
    )


_METHODS: dict[str, Method] = {}


def register(
    name: str,
    params: type[MethodParams],
    *,
    base: BaseUse,
    shape_policy: ShapePolicy = "min",
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    elementwise: bool | Callable[[Any], bool] = False,
    prepare: Callable[[Any, Any], Any] | None = None,
    copies: Callable[[Any], bool] | None = None,
    keeps_nonfinite: bool = False,
    light_prepare: bool = False,
    arrays: bool | Callable[[Any], bool] = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a merge method under ``name`` (its YAML name)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise RuntimeError(f"merge method {name!r} registered twice")
        _METHODS[name] = Method(
            name, fn, params, base, shape_policy, min_models, max_models, random,
            elementwise, prepare, copies, keeps_nonfinite, light_prepare, arrays,
        )
        return fn

    return wrap


def all_methods() -> dict[str, Method]:
    from mergekit import methods  # noqa: F401  (imports every method module)

    return dict(sorted(_METHODS.items()))


def get_method(name: str, where: str = "merge_method") -> Method:
    methods = all_methods()
    if name in methods:
        return methods[name]
    close = difflib.get_close_matches(name, list(methods), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise usage_error(
        where, f"unknown method {name!r}", f"{hint}(known: {', '.join(methods)})"
    )
