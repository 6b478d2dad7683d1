"""Everything in the output folder besides the weights: config, tokenizer, card, recipe."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergekit.architecture import LAYER_COUNT_KEYS, embedding_name
from mergekit.chat_templates import BUILTIN_TEMPLATES, is_literal_template
from mergekit.io.dtypes import ST_DTYPES
from mergekit.io.model import ModelSource, side_file
from mergekit.plan import MergePlan

log = logging.getLogger("mergekit")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json", "tokenizer.tiktoken",
)


def output_config(sources: Mapping[str, ModelSource], plan: MergePlan) -> dict[str, Any]:
    """config.json of the output: the plan's config model's, with layer count, per-layer
    types, dtype and vocabulary size updated."""
    config = json.loads(json.dumps(sources[plan.config_model].config))
    targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"),
                                                            dict) else [])
    for target in targets:
        for key in LAYER_COUNT_KEYS:
            if isinstance(target.get(key), int):
                target[key] = plan.num_layers
        if isinstance(target.get("layer_types"), list) and target["layer_types"]:
            target["layer_types"] = [
                _layer_type(sources[m].config, i, target["layer_types"])
                for m, i in plan.layer_origins
            ]
    float_codes = Counter(j.dtype for j in plan.jobs if j.compute)
    if float_codes:
        name = ST_DTYPES[float_codes.most_common(1)[0][0]][0]
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
    embed = embedding_name(j.output_name for j in plan.jobs)
    job = next((j for j in plan.jobs if j.output_name == embed), None)
    if job is not None and isinstance(config.get("vocab_size"), int) and job.shape:
        config["vocab_size"] = job.shape[0]
    return config


def _layer_type(config: dict[str, Any], layer: int, fallback: list[Any]) -> Any:
    types = config.get("layer_types")
    if not isinstance(types, list):
        text = config.get("text_config")
        types = text.get("layer_types") if isinstance(text, dict) else None
    types = types if isinstance(types, list) and types else fallback
    return types[min(layer, len(types) - 1)]


def copy_tokenizer(src_folder: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (path := side_file(src_folder, name)) is not None:
            shutil.copyfile(path, out / name)
            copied.append(name)
    return copied


def apply_chat_template(out: Path, template: str, sources: list[ModelSource]) -> None:
    """Write the template into the output tokenizer config (and chat_template.jinja)."""
    if template == "auto":
        found = [t for s in sources if (t := _template_of(s.folder))]
        if not found:
            log.warning("chat_template: auto found no template in the inputs; none written")
            return
        text = Counter(found).most_common(1)[0][0]
    elif is_literal_template(template):
        text = template
    else:
        text = BUILTIN_TEMPLATES[template]
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = text
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(text)
    (out / "chat_template.json").unlink(missing_ok=True)


def _template_of(folder: Path) -> str | None:
    jinja = side_file(folder, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text()
    cfg = side_file(folder, "tokenizer_config.json")
    if cfg is not None:
        value = json.loads(cfg.read_text()).get("chat_template")
        return value if isinstance(value, str) else None
    return None
