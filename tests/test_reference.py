"""The generated tables of the README and docs/recipes.md are current, and cover every
method and recipe field."""

from pathlib import Path

import pytest

from mergekit.config import (
    Conditional,
    InputModelDefinition,
    InputSliceDefinition,
    MergeConfiguration,
    OutputSliceDefinition,
)
from mergekit.methods.registry import all_methods
from mergekit.reference import GENERATED_FILES, WRITE_COMMAND, update_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPES = ROOT / "docs" / "recipes.md"


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_blocks_are_current(name):
    text = (ROOT / name).read_text()
    assert "<!-- generated:" in text
    assert update_readme(text) == text, f"{name} is stale: run {WRITE_COMMAND}"


def test_recipes_doc_lists_every_field():
    text = RECIPES.read_text()
    for model in (MergeConfiguration, InputModelDefinition, OutputSliceDefinition,
                  InputSliceDefinition, Conditional):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, (model.__name__, name)


def test_readme_lists_every_method_and_parameter():
    text = README.read_text()
    for method in all_methods().values():
        assert f"| `{method.name}` |" in text
        for param in method.params:
            assert f"`{param.name}`" in text


def test_readme_lists_every_top_level_field():
    text = README.read_text()
    for name in MergeConfiguration.model_fields:
        assert f"| `{name}` |" in text


def test_readme_lists_the_values_of_closed_sets():
    text = README.read_text()
    assert "`consensus` = `sum` (one of: `sum`, `count`)" in text
    assert "`rescale_mode` = `l1` (one of: `l1`, `inverse_density`)" in text
    assert "Literal" not in text
