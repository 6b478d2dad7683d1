"""The model card (README.md) written beside the merged weights."""

from __future__ import annotations

from collections.abc import Sequence

from mergekit.refs import ModelReference


def model_card(
    name: str,
    *,
    recipe_yaml: str,
    method_name: str,
    method_display_name: str,
    paper: str,
    base_model: ModelReference | None,
    models: Sequence[ModelReference],
) -> str:
    """README.md of the output ``name``: hub metadata (the hub models among ``models`` as
    its base models), the method (``paper``: a link, or empty), the models merged besides
    ``base_model``, and the recipe's YAML text."""
    import yaml

    hub_ids = [r.path for r in models if not r.is_local]
    front: dict[str, object] = {}
    if hub_ids:
        front["base_model"] = list(dict.fromkeys(hub_ids))
    front["library_name"] = "transformers"
    front["tags"] = ["mergekit", "merge"]

    def link(ref: ModelReference) -> str:
        text = str(ref)
        return text if ref.is_local else f"[{text}](https://huggingface.co/{ref.path})"

    cited = f" ({paper})" if paper else ""
    base = f" The base model was {link(base_model)}." if base_model else ""
    others = [r for r in models if r != base_model]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {name}",
        "",
        "This model is a merge of pre-trained language models, made with "
        "mergekit.",
        "",
        "## Method",
        "",
        f"Merged with the **{method_display_name}** method (`{method_name}`){cited}.{base}",
        "",
        "## Models merged",
        "",
        *[f"- {link(r)}" for r in others],
        "",
        "## Recipe",
        "",
        "The following YAML recipe produced this model:",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
