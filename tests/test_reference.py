"""The README's generated tables are current, and cover every method and recipe field."""

from pathlib import Path

from mergekit.config import MergeConfiguration
from mergekit.methods.registry import all_methods
from mergekit.reference import update_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_generated_blocks_are_current():
    text = README.read_text()
    assert update_readme(text) == text, (
        "README.md is stale: run python -m mergekit.reference --write README.md")


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
