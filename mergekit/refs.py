"""Model references as recipes write them: a local folder, ``org/name`` or ``org/name@rev``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelReference:
    path: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


def parse_model_reference(text: str) -> ModelReference:
    """Parse a reference; raises ValueError with a message fit for a recipe error."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a model reference must be a non-empty string")
    text = text.strip()
    if os.path.isdir(text):
        return ModelReference(text)
    if "+" in text:
        raise ValueError(
            f"{text!r}: LoRA references (model+lora) are not supported yet; "
            "merge the adapter into its model first and reference that folder"
        )
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
