"""The model card (README.md) written beside the merged weights."""

from __future__ import annotations

from mergekit.config import MergeConfiguration
from mergekit.methods.registry import get_method


def model_card(config: MergeConfiguration, name: str) -> str:
    import yaml

    method = get_method(config.merge_method)
    refs = config.referenced_models()
    hub_ids = [r.path for r in refs if not r.is_local]
    front: dict[str, object] = {}
    if hub_ids:
        front["base_model"] = list(dict.fromkeys(hub_ids))
    front["library_name"] = "transformers"
    front["tags"] = ["mergekit", "merge"]

    def link(ref: object) -> str:
        text = str(ref)
        path = getattr(ref, "path", text)
        local = getattr(ref, "is_local", True)
        return text if local else f"[{text}](https://huggingface.co/{path})"

    paper = f" ({method.reference})" if method.reference else ""
    base = (
        f" The base model was {link(config.base_model)}." if config.base_model else ""
    )
    others = [r for r in refs if r != config.base_model]
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
        f"Merged with the **{method.display_name}** method (`{method.name}`){paper}.{base}",
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
        config.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
