"""Which rows the output embedding takes from where: donor tokens the model also has (by
text) keep the model's row; the others get a ``RowMix`` of model rows by the chosen
approximation. Works on plain data (vocabularies, arrays, tokenizer files); no weights
are read or written here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergekit.errors import usage_error
from mergekit.io.vocab import Vocabulary
from mergekit.surgery.rows import RowMix, mean_mix, omp, pieces_mix, zero_mix

log = logging.getLogger("mergekit")

METHODS = ("omp", "mean", "zero", "subword")


@dataclass(frozen=True)
class RowPlan:
    """The output matrix's rows: ``size`` of them; ``shared_donor[i]`` copies model row
    ``shared_model[i]``; each group (donor ids, mix over model rows) is approximated; any
    other id (one no donor token has) stays zero."""

    size: int
    shared_donor: np.ndarray  # (s,) int64
    shared_model: np.ndarray  # (s,) int64
    groups: tuple[tuple[np.ndarray, RowMix], ...]

    @property
    def approximated(self) -> int:
        return sum(len(ids) for ids, _ in self.groups)


def match_tokens(model: Vocabulary, donor: Vocabulary, model_rows: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shared donor ids, their model ids, missing donor ids), each sorted by donor id. A
    token is shared when the model's tokenizer has its text at an id that has a row."""
    shared: dict[int, int] = {}
    missing: set[int] = set()
    for text, did in donor.ids.items():
        mid = model.ids.get(text)
        if mid is not None and mid < model_rows:
            shared.setdefault(did, mid)
        else:
            missing.add(did)
    missing -= shared.keys()  # one id under two texts: either one shared is enough
    order = sorted(shared)
    return (np.array(order, np.int64), np.array([shared[d] for d in order], np.int64),
            np.array(sorted(missing), np.int64))


def plan_rows(
    method: str,
    k: int,
    model_vocab: Vocabulary,
    donor_vocab: Vocabulary,
    model_rows: int,
    donor_matrix: Callable[[], np.ndarray],
    tokenizers: tuple[Path, Path],
    progress: Callable[[int, str], Any] | None = None,
) -> RowPlan:
    """The row plan for ``method``. ``donor_matrix``: the donor's input embedding as float32
    (read only for omp); ``tokenizers``: the model's and the donor's tokenizer.json (read
    only for subword); ``progress(total, what)``: a tqdm-like bar for the approximation."""
    shared_d, shared_m, missing = match_tokens(model_vocab, donor_vocab, model_rows)
    if not len(shared_d) and method != "zero" and len(missing):
        log.warning("the model and the donor share no token; the new rows are zeros")
    if method == "zero":
        groups = [(missing, zero_mix(len(missing)))]
    elif method == "mean":
        groups = [(missing, mean_mix(shared_m, len(missing)))]
    elif method == "subword":
        groups = _subword(missing, shared_m, model_rows, tokenizers)
    else:
        groups = _omp(missing, shared_d, shared_m, k, donor_matrix, progress)
    groups = [(ids, mix) for ids, mix in groups if len(ids)]
    return RowPlan(donor_vocab.size, shared_d, shared_m, tuple(groups))


def _omp(missing: np.ndarray, shared_d: np.ndarray, shared_m: np.ndarray, k: int,
         donor_matrix: Callable[[], np.ndarray],
         progress: Callable[[int, str], Any] | None) -> list[tuple[np.ndarray, RowMix]]:
    if not len(missing):
        return []
    donor = donor_matrix()  # (donor rows, donor width)
    # a token past the donor's embedding rows has no donor row to approximate
    atoms = shared_d < donor.shape[0]
    targets = missing[missing < donor.shape[0]]
    rowless = missing[missing >= donor.shape[0]]
    if len(rowless):
        log.warning("%d donor tokens have no row in the donor's embedding; they get the "
                    "mean of the shared rows", len(rowless))
    bar = progress(len(targets), "approximating") if progress else None
    try:
        mix = omp(donor[shared_d[atoms]], donor[targets], k, bar)
    finally:
        if bar is not None:
            bar.close()
    return [(targets, mix.remapped(shared_m[atoms])),
            (rowless, mean_mix(shared_m, len(rowless)))]


def _subword(missing: np.ndarray, shared_m: np.ndarray, model_rows: int,
             tokenizers: tuple[Path, Path]) -> list[tuple[np.ndarray, RowMix]]:
    """Each missing token's text, as the donor decodes it, encoded by the model's own
    tokenizer: the mean of those pieces' rows (of the shared mean when there are none)."""
    model_tok, donor_tok = (_load_tokenizer(p) for p in tokenizers)
    pieced, pieces, bare = [], [], []
    for did in missing.tolist():
        text = donor_tok.decode([did], skip_special_tokens=False)
        ids = [i for i in model_tok.encode(text, add_special_tokens=False).ids
               if i < model_rows]
        if ids:
            pieced.append(did)
            pieces.append(ids)
        else:
            bare.append(did)
    return [(np.array(pieced, np.int64), pieces_mix(pieces)),
            (np.array(bare, np.int64), mean_mix(shared_m, len(bare)))]


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exception
        raise usage_error(str(path), f"the tokenizers library cannot load it ({exc})",
                          "use the model's original tokenizer.json") from None
