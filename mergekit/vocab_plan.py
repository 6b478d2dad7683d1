"""The output's vocabulary and, for every input model, where each of its embedding and head
rows comes from once permuted into it (by token text, never by row number): the plain data
the engine gathers rows by (``execute.py``), decided before any weight is read.

A model's row for a token is its own when it has the token (and the recipe does not
``force`` another source). Otherwise, in order: the recipe's ``tokenizer.tokens`` source for
it; the base model's row; the row of the one model that has the token; the mean of the
rows of the models that have it; zeros, with a warning. Rows past the last token
(``pad_to_multiple_of``, or a model's own untokened rows) are each model's mean over its
rows for the output's tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit.errors import MergeError, usage_error
from mergekit.io.vocab import Vocabulary, read_vocabulary
from mergekit.printable import printable

if TYPE_CHECKING:
    import numpy as np

# a substitute row that is the model's mean over its rows for the output's tokens
MEAN = "mean"
Rows = tuple[tuple[str, int], ...]  # rows (model, row) averaged; () is zeros


@dataclass(frozen=True)
class RowMap:
    """One model's rows in the output vocabulary: ``own[i]`` its row for output row i, or
    -1 where ``subs`` gives a substitute (rows averaged, or ``MEAN``). ``own`` is a
    read-only int64 numpy array: a vocabulary of 256k rows is 2 MB, not a tuple's 9."""

    own: np.ndarray
    subs: Mapping[int, Rows | str]


@dataclass(frozen=True)
class VocabPlan:
    source: str  # 'union', or the folder whose tokenizer the output takes
    size: int  # rows of the output's embedding and head
    tokens: int  # rows with a token; the rest are padding
    maps: Mapping[str, RowMap]  # by model key
    new_tokens: tuple[tuple[str, int, Mapping[str, Any] | None], ...]  # union: added here
    tokenizer_folder: Path  # the tokenizer the output's files start from
    summary: tuple[str, ...]  # for --dry-run and the log
    warnings: tuple[str, ...]

    def digest(self) -> str:
        """The row maps, for the resume fingerprint."""
        h = hashlib.sha256(f"{self.size} {self.tokens}".encode())
        for model in sorted(self.maps):
            m = self.maps[model]
            h.update(model.encode() + b"\0" + m.own.tobytes())
            h.update(repr(sorted(m.subs.items())).encode())
        return h.hexdigest()[:16]


def plan_vocabulary(
    *,
    source: str | None,
    block: Any,
    models: Sequence[str],
    base: str | None,
    config_model: str,
    folders: Mapping[str, Path],
    rows: Mapping[str, int],
    source_folder: Path | None,
) -> VocabPlan | None:
    """The vocabulary plan, or None when every model has the same tokens at the same ids and
    the same rows (nothing to permute: the merge goes row by row, as without a tokenizer).

    ``source``: the recipe's 'union', 'base', a model reference or None; ``block``: the
    recipe's ``tokenizer:`` block or None; ``models``: the recipe's model keys; ``folders``
    and ``rows``: each model's folder and embedding rows; ``source_folder``: the folder of
    a tokenizer source that is not a model of the recipe."""
    def readable(folder: Path) -> Vocabulary | None:
        """Unasked for, a tokenizer file that cannot be read only means no matching."""
        try:
            return read_vocabulary(folder)
        except MergeError:
            if source is None:
                return None
            raise

    vocabs = {m: readable(folders[m]) for m in models}
    tokens_cfg = dict(block.tokens or {}) if block is not None else {}
    pad = block.pad_to_multiple_of if block is not None else None
    same = (len({tuple(sorted(v.ids.items())) if v else None for v in vocabs.values()}) == 1
            and len(set(rows.values())) == 1)
    if all(v is None for v in vocabs.values()) or (source is None and (
            same or any(v is None for v in vocabs.values()))):
        return None  # nothing to match rows by, or nothing asked and nothing to match
    missing = [m for m, v in vocabs.items() if v is None]
    if missing:
        raise usage_error(f"model {missing[0]}", "has no tokenizer.json, needed to match its "
                          "embedding rows to the other models' by token",
                          "add the model's fast tokenizer (tokenizer.json), or merge models "
                          "with one vocabulary")
    known: dict[str, Vocabulary] = {m: v for m, v in vocabs.items() if v is not None}
    # a model's tokens past its embedding rows have no row: the model lacks them
    has = {m: {t: i for t, i in v.ids.items() if i < rows[m]} for m, v in known.items()}
    ref = base or config_model
    warnings: list[str] = []
    new_tokens: list[tuple[str, int, Mapping[str, Any] | None]] = []
    if source == "union":
        out_ids = dict(has[ref])
        folder = folders[ref]
        next_id = max(out_ids.values(), default=-1) + 1
        for m in [ref, *[m for m in models if m != ref]]:
            for _, text in sorted((i, t) for t, i in has[m].items() if t not in out_ids):
                out_ids[text] = next_id
                new_tokens.append((text, next_id, known[m].added.get(text)))
                next_id += 1
        size = max(out_ids.values(), default=-1) + 1
        label = f"union of {len(models)} tokenizers"
    else:
        if source is None:
            folder, label = folders[config_model], f"{config_model}'s tokenizer"
        elif source == "base":
            folder, label = folders[ref], f"{ref}'s tokenizer (base)"
        elif source_folder is not None:
            folder, label = source_folder, f"{source}'s tokenizer"
        else:
            folder, label = folders[source], f"{source}'s tokenizer"
        out_vocab = read_vocabulary(folder)
        if out_vocab is None:
            raise usage_error("tokenizer_source", f"{folder} has no tokenizer.json",
                              "name a model with a fast tokenizer")
        out_ids = dict(out_vocab.ids)
        size = out_vocab.size
        if folder in [folders[m] for m in models]:  # its own untokened rows stay rows
            owner = next(m for m in models if folders[m] == folder)
            size = max(size, rows[owner])
    tokens = size
    if pad:
        size = -(-size // pad) * pad
    # every entry is checked, also one for a token the output lacks (then unused)
    recipe_rows = {text: _recipe_rows(spec, text, has, known, rows)
                   for text, spec in tokens_cfg.items()}
    for text in tokens_cfg:
        if text not in out_ids:
            warnings.append(f"tokenizer.tokens.{printable(repr(text))}: the output's "
                            "vocabulary has no such token; the entry is unused")

    def row_of(m: str, text: str) -> int | None:
        return has[m].get(text)

    counts = {"own": 0, "recipe": 0, "base": 0, "one model": 0, "mean": 0, "zero": 0,
              "padding": size - len(out_ids)}
    defaults: list[str] = []
    subs_for: dict[int, tuple[Rows | str, bool]] = {}  # out row -> (substitute, forced)
    held = [has[m] for m in models]
    for text, i in out_ids.items():
        spec = tokens_cfg.get(text)
        if spec is None and all(text in h for h in held):
            counts["own"] += 1
            continue
        holders = [m for m in models if row_of(m, text) is not None]
        if spec is not None:
            subs_for[i] = (recipe_rows[text], spec.force)
            counts["recipe"] += 1
            continue
        if base is not None and row_of(base, text) is not None:
            sub: Rows = ((base, has[base][text]),)
            how = f"the base's row ({base})"
            counts["base"] += 1
        elif len(holders) == 1:
            sub = ((holders[0], has[holders[0]][text]),)
            how = f"the row of {holders[0]}, the one model with it"
            counts["one model"] += 1
        elif holders:
            sub = tuple((m, has[m][text]) for m in holders)
            how = f"the mean of {', '.join(holders)}"
            counts["mean"] += 1
        else:
            sub = ()
            how = "zeros: no model has it"
            counts["zero"] += 1
            warnings.append(f"token {printable(repr(text))}: no model has it; its row is zeros")
        subs_for[i] = (sub, False)
        lacking = [m for m in models if m not in holders]
        defaults.append(f"  {printable(repr(text))} (id {i}), lacking in {', '.join(lacking)}: "
                        f"{how}")
    import numpy as np

    tokened = np.zeros(size, bool)
    tokened[list(out_ids.values())] = True
    untokened = np.flatnonzero(~tokened).tolist()
    maps = {}
    for m in models:
        pairs = [(i, has[m][t]) for t, i in out_ids.items() if t in has[m]]
        own = np.full(size, -1, np.int64)
        if pairs:
            at, rows_of = zip(*pairs)
            own[list(at)] = rows_of
        subs: dict[int, Rows | str] = dict.fromkeys(untokened, MEAN)
        for i, (sub, forced) in subs_for.items():
            if forced or own[i] < 0:
                subs[i] = sub
                own[i] = -1
        own.flags.writeable = False
        maps[m] = RowMap(own, subs)
    counts["own"] = len(out_ids) - sum(counts[k] for k in ("recipe", "base", "one model",
                                                              "mean", "zero"))
    summary = [f"vocabulary: {label}, {size} rows ({len(out_ids)} tokens"
               + (f", {counts['padding']} padding" if counts["padding"] else "") + ")",
               "  rows from every model: {own}, set in the recipe: {recipe}, from the base: "
               "{base}, from the one model with the token: {one model}, mean of the models "
               "with it: {mean}, zeros: {zero}".format(**counts)]
    if defaults:
        summary.append(f"  tokens some models lack ({len(defaults)}), as chosen by default:")
        summary.extend(defaults[:50])
        if len(defaults) > 50:
            summary.append(f"  and {len(defaults) - 50} more")
    if all(np.array_equal(m.own, np.arange(size)) and not m.subs and rows[k] == size
           for k, m in maps.items()):
        return None  # every model already has the output's rows
    return VocabPlan("union" if source == "union" else str(folder), size, tokens, maps,
                     tuple(new_tokens), folder, tuple(summary), tuple(warnings))


def _recipe_rows(spec: Any, text: str, has: Mapping[str, Mapping[str, int]],
                 known: Mapping[str, Vocabulary], rows: Mapping[str, int]) -> Rows:
    """The rows a ``tokenizer.tokens`` entry names, checked against the models."""
    where = f"tokenizer.tokens.{printable(repr(text))}.source"
    src = spec.source
    kind = getattr(src, "kind", None)
    if kind == "zero":
        return ()
    if kind == "model_token":
        model = str(src.model)
        if src.token_id is not None:
            if src.token_id >= rows[model]:
                raise usage_error(where, f"token_id {src.token_id} is past the "
                                  f"{rows[model]} rows of {model}",
                                  f"give a row below {rows[model]}")
            return ((model, src.token_id),)
        row = has[model].get(src.token)
        if row is None:
            raise usage_error(where, f"{model} has no token {printable(repr(src.token))}",
                              "name a token of its tokenizer, or a token_id")
        return ((model, row),)
    model = str(src)
    row = has[model].get(text)
    if row is None:
        raise usage_error(where, f"{model} has no token {printable(repr(text))}",
                          "name a model that has it, or use {kind: model_token, ...}")
    return ((model, row),)
