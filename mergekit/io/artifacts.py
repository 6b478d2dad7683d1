"""Everything in the output folder besides the weights: config, tokenizer, card, recipe.

They are resolved into plain data (the text of each file, or the input file it copies)
before any weight is read, so a bad tokenizer source or template stops the run at once,
and written after the weights."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit.architecture import LAYER_COUNT_KEYS
from mergekit.chat_templates import template_text
from mergekit.errors import merge_failure, usage_error
from mergekit.io.model import side_file
from mergekit.io.output_folder import writing

log = logging.getLogger("mergekit")

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
CARD = "README.md"
RECIPE = "mergekit_config.yml"
TOKENIZER_FILES = (
    "tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model",
    CHAT_TEMPLATE, "chat_template.json", "tokenizer.tiktoken",
)
# every file an output may hold besides the weights, their index and the manifest
FILE_NAMES = (CONFIG, GENERATION_CONFIG, *TOKENIZER_FILES, CARD, RECIPE)


@dataclass(frozen=True)
class Artifacts:
    """The output's files besides the weights: the text of each one made here, and the
    input file each copied one comes from (checked to be readable)."""

    texts: Mapping[str, str]
    copies: Mapping[str, Path]


def output_config(
    base: Mapping[str, Any],
    num_layers: int,
    layer_origins: Sequence[tuple[Mapping[str, Any], int]],
    torch_dtype: str | None,
    vocab_size: int | None,
) -> dict[str, Any]:
    """config.json of the output: a copy of ``base`` (the config.json it takes) with the
    layer count, the per-layer types (``layer_origins``: per output layer, the config.json
    of the model it comes from and its layer there), the dtype (None: unchanged) and the
    vocabulary size (the output embedding's rows; None: unchanged) updated."""
    config = json.loads(json.dumps(base))
    targets = [config] + ([config["text_config"]] if isinstance(config.get("text_config"),
                                                            dict) else [])
    for target in targets:
        for key in LAYER_COUNT_KEYS:
            if isinstance(target.get(key), int):
                target[key] = num_layers
        if isinstance(target.get("layer_types"), list) and target["layer_types"]:
            target["layer_types"] = [
                _layer_type(origin, i, target["layer_types"]) for origin, i in layer_origins
            ]
    if torch_dtype is not None:
        config["torch_dtype"] = torch_dtype
        if "dtype" in config:
            config["dtype"] = torch_dtype
    if vocab_size is not None and isinstance(config.get("vocab_size"), int):
        config["vocab_size"] = vocab_size
    return config


def _layer_type(config: Mapping[str, Any], layer: int, fallback: list[Any]) -> Any:
    types = config.get("layer_types")
    if not isinstance(types, list):
        text = config.get("text_config")
        types = text.get("layer_types") if isinstance(text, dict) else None
    types = types if isinstance(types, list) and types else fallback
    return types[min(layer, len(types) - 1)]


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer files in ``folder``, by name (each checked by ``side_file``)."""
    return {name: path for name in TOKENIZER_FILES
            if (path := side_file(folder, name)) is not None}


def resolve_artifacts(
    *,
    config: dict[str, Any],
    recipe_yaml: str,
    generation_config: Path | None = None,
    tokenizer: Mapping[str, Path] | None = None,
    tokenizer_texts: Mapping[str, str] | None = None,
    chat_template: str | None = None,
    input_folders: Sequence[Path] = (),
    card: str | None = None,
) -> Artifacts:
    """Everything the output holds besides the weights. ``tokenizer``: the files to copy;
    ``tokenizer_texts``: tokenizer files written rather than copied (a union's);
    ``chat_template``: the recipe's value, written into the tokenizer config (``auto``
    takes the most common template among ``input_folders``). Raises a usage error naming
    the file when an input file is unreadable or malformed."""
    texts = {CONFIG: json.dumps(config, indent=2) + "\n"}
    copies = dict(tokenizer or {})
    for name, text in (tokenizer_texts or {}).items():  # written instead of copied
        copies.pop(name, None)
        texts[name] = text
    if generation_config is not None:
        copies[GENERATION_CONFIG] = generation_config
    if chat_template is not None:
        text = _auto_template(input_folders) if chat_template == "auto" else template_text(
            chat_template)
        if text is not None:
            source = copies.pop(TOKENIZER_CONFIG, None)
            tok_config = read_json_object(source) if source is not None else (
                json.loads(texts[TOKENIZER_CONFIG]) if TOKENIZER_CONFIG in texts else {})
            tok_config["chat_template"] = text
            texts[TOKENIZER_CONFIG] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
            texts[CHAT_TEMPLATE] = text
            copies.pop(CHAT_TEMPLATE, None)
            copies.pop("chat_template.json", None)  # it would override the new template
    texts[RECIPE] = recipe_yaml
    if card is not None:
        texts[CARD] = card
    for path in copies.values():
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise usage_error(str(path), f"cannot read ({exc.strerror or exc})",
                              "check the file and its permissions") from None
    return Artifacts(texts, copies)


def write_artifacts(folder: Path, artifacts: Artifacts) -> None:
    """Write the resolved files into ``folder``."""
    for name, source in artifacts.copies.items():
        try:
            data = source.read_bytes()
        except OSError as exc:  # it was readable before the merge
            raise merge_failure(str(source), f"cannot read ({exc.strerror or exc})",
                                "check the file and rerun the same command") from None
        with writing(folder / name):
            (folder / name).write_bytes(data)
    for name, text in artifacts.texts.items():
        with writing(folder / name):
            (folder / name).write_text(text, encoding="utf-8")


def _auto_template(folders: Sequence[Path]) -> str | None:
    found = [t for f in folders if (t := _template_of(f))]
    if not found:
        log.warning("chat_template: auto found no template in the inputs; none written")
        return None
    return Counter(found).most_common(1)[0][0]


def _template_of(folder: Path) -> str | None:
    """The chat template a model folder carries: chat_template.jinja, else the
    tokenizer config's ``chat_template``."""
    jinja = side_file(folder, CHAT_TEMPLATE)
    if jinja is not None:
        return _read_text(jinja)
    path = side_file(folder, TOKENIZER_CONFIG)
    if path is None:
        return None
    value = read_json_object(path).get("chat_template")
    if value is not None and not isinstance(value, str):
        raise usage_error(str(path), f"chat_template is {_json_kind(value)}, not a string",
                          "name a built-in or a Jinja template in the recipe's chat_template "
                          "instead of auto")
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; a usage error naming the file otherwise."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise usage_error(str(path), f"not valid JSON (line {exc.lineno} column {exc.colno}: "
                          f"{exc.msg})", "fix or replace the file") from None
    except RecursionError:
        raise usage_error(str(path), "not valid JSON (nested too deeply)",
                          "fix or replace the file") from None
    if not isinstance(data, dict):
        raise usage_error(str(path), f"holds {_json_kind(data)}, not a JSON object",
                          "fix or replace the file")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise usage_error(str(path), f"cannot read ({exc.strerror or exc})",
                          "check the file and its permissions") from None
    except UnicodeDecodeError:
        raise usage_error(str(path), "not UTF-8 text", "fix or replace the file") from None


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
