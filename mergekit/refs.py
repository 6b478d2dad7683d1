"""Model references as recipes write them: a local folder, ``org/name`` or ``org/name@rev``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelReference:
    """A model (``path``, ``revision``), and a LoRA adapter applied to it (``lora``: the
    adapter's own reference), written ``model+adapter``."""

    path: str
    revision: str | None = None
    lora: ModelReference | None = None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)

    @property
    def model(self) -> ModelReference:
        """The model without its adapter."""
        return ModelReference(self.path, self.revision)

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.lora}" if self.lora is not None else text


def parse_model_reference(text: str) -> ModelReference:
    """Parse a reference; raises ValueError with a message fit for a recipe error."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a model reference must be a non-empty string")
    text = text.strip()
    if os.path.isdir(text):
        return ModelReference(text)
    if "+" in text:
        return _with_adapter(text)
    return _plain(text)


def _with_adapter(text: str) -> ModelReference:
    """``model+adapter``: the first split at a '+' where both sides are references (a
    folder's name may hold a '+')."""
    problems = []
    for i, c in enumerate(text):
        if c != "+":
            continue
        left, right = text[:i].strip(), text[i + 1:].strip()
        if not left or not right:
            continue
        try:
            model = parse_model_reference(left)
            adapter = parse_model_reference(right)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if model.lora is not None or adapter.lora is not None:
            raise ValueError(f"{text!r}: one adapter per model; write 'model+adapter'")
        return ModelReference(model.path, model.revision, adapter)
    raise ValueError(problems[-1] if problems else
                     f"{text!r}: expected 'model+adapter', each a folder or a hub id")


def reference_from_mapping(data: dict) -> ModelReference:
    """The mapping form mergekit 0.1.x also takes: ``{model: {path, revision}, lora: {path,
    revision}}`` (``lora`` optional; each part may also be a plain reference string)."""
    def part(value: object, key: str) -> ModelReference:
        if isinstance(value, str):
            return parse_model_reference(value)
        if isinstance(value, dict) and isinstance(value.get("path"), str) and set(value) <= {
                "path", "revision"}:
            revision = value.get("revision")
            if revision is not None and not isinstance(revision, str):
                raise ValueError(f"{key}.revision: give a string")
            ref = parse_model_reference(value["path"])
            return ModelReference(ref.path, revision or ref.revision, ref.lora)
        raise ValueError(f"{key}: give a reference string or {{path, revision}}")

    if set(data) - {"model", "lora"} or "model" not in data:
        raise ValueError("a model mapping takes 'model' and an optional 'lora'")
    model = part(data["model"], "model")
    if data.get("lora") is None:
        return model
    adapter = part(data["lora"], "lora")
    return ModelReference(model.path, model.revision, adapter)


def _plain(text: str) -> ModelReference:
    path, revision = text, None
    if "@" in text:
        path, _, revision = text.rpartition("@")
        if not path or not revision:
            raise ValueError(f"{text!r}: expected 'org/name@revision'")
    if os.path.isdir(path):
        raise ValueError(f"{text!r}: a revision can only be given for a hub model, not a folder")
    if not _HUB_ID.match(path):
        raise ValueError(
            f"{text!r} is neither an existing folder nor a hub id like 'org/name'; "
            "check the path"
        )
    return ModelReference(path, revision)
