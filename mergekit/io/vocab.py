"""A model's vocabulary as its tokenizer files give it (token text -> id), read from
``tokenizer.json`` and ``tokenizer_config.json`` without loading a tokenizer; and the files
of an output tokenizer that gains tokens (the union of several vocabularies).

Tokens are compared by their text as the tokenizer stores it: a byte-level BPE's ``Ġhello``
and a SentencePiece model's ``▁hello`` are different tokens, as they are for the model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit.errors import usage_error
from mergekit.io.model import side_file
from mergekit.printable import printable

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


@dataclass(frozen=True)
class Vocabulary:
    """``ids``: every token's text -> its id (the model's vocabulary and its added tokens).
    ``added``: the added tokens' entries as ``tokenizer.json`` stores them (content,
    special, normalized, ...), by text. ``kind``: the tokenizer model's type (BPE, Unigram,
    WordPiece, WordLevel)."""

    ids: Mapping[str, int]
    added: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    kind: str = ""

    @property
    def size(self) -> int:
        """Rows the vocabulary needs: its largest id plus one."""
        return max(self.ids.values(), default=-1) + 1

    def by_id(self) -> dict[int, str]:
        return {i: t for t, i in self.ids.items()}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise usage_error(str(path), f"cannot parse ({exc})",
                          "replace it with the model's original tokenizer file") from None


def read_vocabulary(folder: Path) -> Vocabulary | None:
    """The vocabulary of the tokenizer in ``folder``; None when it has no ``tokenizer.json``
    (a SentencePiece ``tokenizer.model`` alone, or no tokenizer at all)."""
    path = side_file(folder, TOKENIZER_JSON)
    if path is None:
        return None
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise usage_error(str(path), "has no 'model' object",
                          "replace it with the model's original tokenizer file")
    kind = str(model.get("type", ""))
    vocab = model.get("vocab")
    ids: dict[str, int] = {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        for text, i in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise usage_error(str(path), f"token {printable(repr(text))} has id {i!r}",
                                  "ids must be non-negative integers")
            ids[text] = i
    elif isinstance(vocab, list):  # Unigram: [text, score] pairs in id order
        for i, entry in enumerate(vocab):
            if not isinstance(entry, list | tuple) or not entry or not isinstance(entry[0], str):
                raise usage_error(str(path), f"vocab entry {i} is not [text, score]",
                                  "replace it with the model's original tokenizer file")
            ids.setdefault(entry[0], i)
    else:
        raise usage_error(str(path), "model.vocab is neither a mapping nor a list",
                          "replace it with the model's original tokenizer file")
    added: dict[str, dict[str, Any]] = {}
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or \
                not isinstance(entry.get("id"), int):
            raise usage_error(str(path), f"added token {printable(repr(entry))[:80]} lacks "
                              "content or id", "replace it with the model's original file")
        ids[entry["content"]] = entry["id"]
        added[entry["content"]] = dict(entry)
    config_path = side_file(folder, TOKENIZER_CONFIG)
    decoder = read_json(config_path).get("added_tokens_decoder") if config_path else None
    if isinstance(decoder, dict):  # tokens added by transformers that tokenizer.json lacks
        for key, entry in decoder.items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and \
                    str(key).isdigit() and entry["content"] not in ids:
                ids[entry["content"]] = int(key)
                added[entry["content"]] = {"id": int(key), **entry}
    return Vocabulary(ids, added, kind)


def union_tokenizer(
    folder: Path, new_tokens: Sequence[tuple[str, int, Mapping[str, Any] | None]],
) -> dict[str, str]:
    """The tokenizer files of ``folder`` with ``new_tokens`` added: (text, id, the entry
    of an added token in the model it comes from, or None for a plain vocabulary token,
    which joins the vocabulary; a Unigram's, whose ids are its list's positions, becomes an
    added token that is not special). Returns file name -> text, for the
    files that change: ``tokenizer.json`` and ``tokenizer_config.json``."""
    path = side_file(folder, TOKENIZER_JSON)
    if path is None:
        raise usage_error(str(folder), "has no tokenizer.json to add tokens to",
                          "use a model with a fast tokenizer as the base of the union")
    data = read_json(path)
    entries = list(data.get("added_tokens") or [])
    config_path = side_file(folder, TOKENIZER_CONFIG)
    tok_config = read_json(config_path) if config_path else {}
    decoder = tok_config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) and config_path is not None:
        # transformers writes every added token there; the base had none until now
        decoder = {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}
        tok_config["added_tokens_decoder"] = decoder
    if not isinstance(decoder, dict):
        decoder = None
    model = data.get("model") if isinstance(data, dict) else None
    plain_vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(plain_vocab, dict):
        # the tokenizers library numbers an added token that is not in the vocabulary
        # after the vocabulary's size, whatever id the file gives it: in the vocabulary
        # too, every added token keeps its id however many tokens join it
        for entry in entries:
            plain_vocab.setdefault(entry["content"], entry["id"])
    for text, i, entry in new_tokens:
        if isinstance(plain_vocab, dict):
            plain_vocab[text] = i
        if entry is None and isinstance(plain_vocab, dict):
            # a plain token joins the vocabulary only, without merges: it keeps its row and
            # decodes, and encoding the base's text does not change (as an added token it
            # would be split out of every text holding it, even inside other added tokens)
            continue
        new = {"id": i, "content": text, "single_word": False, "lstrip": False,
               "rstrip": False, "normalized": False, "special": False}
        if entry is not None:
            new.update({k: v for k, v in entry.items() if k in new and k not in ("id",)})
        entries.append(new)
        if decoder is not None:
            decoder[str(i)] = {k: v for k, v in new.items() if k != "id"}
    data["added_tokens"] = entries
    # compact: json's C encoder does not indent, and a 256k-token file is 10x slower so
    files = {TOKENIZER_JSON: json.dumps(data, ensure_ascii=False) + "\n"}
    if config_path is not None:
        files[TOKENIZER_CONFIG] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
    return files
