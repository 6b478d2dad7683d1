"""Reference text generated from the code: the method table and the recipe fields.

The tables in README.md and docs/recipes.md are this module's output (a test keeps them
current), so the parameter declarations next to each method and the field descriptions
of the recipe are the only place they are written.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mergekit.methods.registry import Method, all_methods

BASE_WORDS = {"required": "required", "optional": "optional", "unused": "not used"}


def _default(p: Any) -> str:
    if p.required:
        return "required"
    return "`" + str(p.default).lower() + "`" if isinstance(p.default, bool) else f"`{p.default}`"


def _choices(p: Any, quote: str = "") -> str:
    """"one of: a, b" for a parameter with a closed set of values (a Literal); else ""."""
    return "one of: " + ", ".join(f"{quote}{c}{quote}" for c in p.choices) if p.choices else ""


def method_table() -> str:
    rows = [
        "| method | name | base model | parameters (default) |",
        "|---|---|---|---|",
    ]
    for m in all_methods().values():
        params = "; ".join(
            f"`{p.name}`{' (per model)' if p.per_model else ''} = {_default(p)}"
            + (f" ({_choices(p, '`')})" if p.choices else "")
            for p in m.params
        )
        name = f"[{m.display_name}]({m.reference})" if m.reference else m.display_name
        rows.append(f"| `{m.name}` | {name} | {BASE_WORDS[m.base]} | {params or '–'} |")
    return "\n".join(rows)


def method_details(m: Method) -> str:
    lines = [f"{m.name}: {m.display_name}" + (f"  <{m.reference}>" if m.reference else ""),
             f"  base model: {BASE_WORDS[m.base]}"]
    for p in m.params:
        scope = "per model" if p.per_model else "global"
        choices = f"; {_choices(p)}" if p.choices else ""
        lines.append(f"  {p.name} ({p.kind}, {scope}, {_default(p).strip('`')}{choices}): "
                     f"{p.description}")
    return "\n".join(lines)


def method_listing() -> str:
    return "\n\n".join(method_details(m) for m in all_methods().values())


def recipe_top_level(title: str | None = None) -> str:
    """The table of the recipe's top-level fields."""
    from mergekit.config import MergeConfiguration

    return _fields_table(title, MergeConfiguration)


def recipe_reference() -> str:
    """The tables of every field a recipe may contain, top level and nested."""
    from mergekit.config import (
        Conditional,
        InputModelDefinition,
        InputSliceDefinition,
        OutputSliceDefinition,
    )
    from mergekit.recipe_fields import (
        ModelTokenSource,
        OutputBlock,
        TokenizerBlock,
        TokenSource,
    )

    parts = [recipe_top_level("top level")]
    for title, model in (
        ("`models[*]`", InputModelDefinition),
        ("`slices[*]`", OutputSliceDefinition),
        ("`slices[*].sources[*]`", InputSliceDefinition),
        ("`{filter, value}` entries of a parameter", Conditional),
        ("`tokenizer`", TokenizerBlock),
        ("`tokenizer.tokens.<token>`", TokenSource),
        ("`{kind: model_token}` source of a token", ModelTokenSource),
        ("`output`", OutputBlock),
    ):
        parts.append(_fields_table(title, model))
    return "\n\n".join(parts)


def _fields_table(title: str | None, model: type[BaseModel]) -> str:
    rows = [f"**{title}**", ""] if title else []
    rows += ["| field | required | meaning |", "|---|---|---|"]
    for name, info in model.model_fields.items():
        rows.append(f"| `{name}` | {'yes' if info.is_required() else 'no'} | "
                    f"{info.description or ''} |")
    return "\n".join(rows)


GENERATED = {
    "methods": method_table,
    "recipe-top": recipe_top_level,
    "recipe": recipe_reference,
}
# the files holding generated blocks, relative to the repository root
GENERATED_FILES = ("README.md", "docs/recipes.md")
WRITE_COMMAND = "python -m mergekit.reference --write " + " ".join(GENERATED_FILES)


def render_block(name: str) -> str:
    return (f"<!-- generated:{name} ({WRITE_COMMAND}) -->\n"
            f"{GENERATED[name]()}\n<!-- end:{name} -->")


def update_readme(text: str) -> str:
    """Replace every generated block in a Markdown text (the README, or a file under docs/)
    with fresh output; blocks the text does not have are left out."""
    import re

    for name in GENERATED:
        pattern = re.compile(rf"<!-- generated:{name} .*?<!-- end:{name} -->", re.S)
        text = pattern.sub(lambda _m, n=name: render_block(n), text)
    return text


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) >= 3 and sys.argv[1] == "--write":
        for path in map(Path, sys.argv[2:]):
            path.write_text(update_readme(path.read_text()))
    else:
        print(method_table())
        print()
        print(recipe_reference())
