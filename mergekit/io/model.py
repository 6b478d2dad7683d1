"""One input model: its config, its tensor names, and lazy access to each tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit.errors import merge_failure, usage_error
from mergekit.io.dtypes import st_code
from mergekit.io.hub import SMALL_FILES
from mergekit.io.safetensors_file import SafetensorsReader, TensorInfo, read_header, shown
from mergekit.refs import ModelReference

if TYPE_CHECKING:
    import numpy as np
    import torch

WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def inside(folder: Path, path: Path) -> Path:
    """``path``, after checking that it leads to a file inside ``folder`` once every link
    is followed (the folder's own links first: it may be a link itself). A hub cache
    snapshot (``models--org--name/snapshots/<rev>``) may also lead into that repository's
    ``blobs/``. Anything else is refused: a link in a git clone must not copy a file from
    elsewhere into the output, which users upload."""
    try:
        root = folder.resolve()
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop, before Python 3.13
        raise usage_error(str(path), f"cannot follow its links ({exc})",
                          "replace the link by the file itself") from None
    if target.is_relative_to(root):
        return path
    repo = root.parent.parent
    if (root.parent.name == "snapshots" and repo.name.startswith("models--")
            and target.is_relative_to(repo / "blobs")):
        return path
    raise usage_error(str(path), f"leads outside the model folder {root} "
                      f"(to {shown(str(target))})",
                      "refusing to read it; replace the link by the file itself")


def side_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` when it is a file inside the folder (see ``inside``), None when there
    is no such file; the one way to find a file besides the weights (config, tokenizer,
    generation config, chat template)."""
    path = folder / name
    return inside(folder, path) if path.is_file() else None


class ModelSource:
    """A model in a local folder (a hub snapshot is one); weight files are fetched on demand."""

    def __init__(
        self,
        ref: ModelReference,
        folder: Path,
        fetch: Callable[[str], Path | None],
        reader: SafetensorsReader,
    ) -> None:
        self.ref = ref
        self.folder = folder
        self._fetch = fetch
        self._reader = reader
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._check_small_files()
        self.config = self._load_config()
        self.weight_map = self._find_weights()  # tensor name -> weight file name

    @property
    def key(self) -> str:
        return str(self.ref)

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    def side_file(self, name: str) -> Path | None:
        """The file ``name`` beside the weights, or None (see ``side_file``)."""
        return side_file(self.folder, name)

    def _check_small_files(self) -> None:
        """Refuse, as the model is opened and before any weight is read, a config, tokenizer,
        template or index file in the folder that is a link leading outside it."""
        try:
            links = [e.name for e in os.scandir(self.folder) if e.is_symlink()]
        except OSError:
            return  # reported as a missing config.json
        for name in links:
            if any(fnmatch(name, pattern) for pattern in SMALL_FILES):
                inside(self.folder, self.folder / name)

    def _load_config(self) -> dict[str, Any]:
        path = self.side_file("config.json")
        if path is None:
            raise usage_error(f"model '{self.ref}'", f"no config.json in {self.folder}",
                              "point the recipe at a transformers model folder")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise usage_error(str(path), f"cannot parse config.json ({exc})",
                              "fix or re-download the file") from None
        if not isinstance(config, dict):
            raise usage_error(str(path), "config.json is not a JSON object", "fix the file")
        return config

    def _find_weights(self) -> dict[str, str]:
        for index_name, single_name in WEIGHT_LAYOUTS:
            index = self._get(index_name)
            if index is not None:
                return self._read_index(index)
            single = self._get(single_name)
            if single is not None:
                return dict.fromkeys(self._names_in(single_name), single_name)
        loose = sorted(p.name for p in self.folder.glob("*.safetensors"))
        for name in loose:
            if not name.isprintable():  # it would go into messages as it is
                raise usage_error(f"model '{self.ref}'", f"a weight file's name has control "
                                  f"characters ({shown(name)})", "rename the file")
        if loose:
            return {n: f for f in loose for n in self._names_in(f)}
        raise usage_error(f"model '{self.ref}'", f"no weights found in {self.folder}",
                          "expected model.safetensors, a sharded index, or pytorch_model.bin")

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise merge_failure(str(path), "not a valid shard index (no weight_map object)",
                                "fix or re-download the file")
        for name, filename in weight_map.items():
            p = Path(str(filename))
            if not str(filename).isprintable():  # it would go into messages as it is
                raise merge_failure(
                    str(path), f"weight_map entry {shown(name)} names a file with control "
                    f"characters ({shown(filename)})", "the index is broken or hostile")
            if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
                raise merge_failure(
                    str(path), f"weight_map entry {shown(name)} points outside the model folder "
                    f"({shown(filename)})", "refusing to read it; the index is broken or hostile")
        return {str(k): str(v) for k, v in weight_map.items()}

    def _get(self, filename: str) -> Path | None:
        """A file of the model, fetched if need be, and checked to lie inside its folder."""
        path = self._fetch(filename)
        return None if path is None else inside(self.folder, path)

    def _file(self, filename: str) -> Path:
        path = self._get(filename)
        if path is None:
            raise merge_failure(f"model '{self.ref}'", f"shard {shown(filename)} is missing",
                                "the download is incomplete; fetch the model again")
        return path

    def _names_in(self, filename: str) -> list[str]:
        if filename.endswith(".bin"):
            return list(self._load_bin(filename))
        return list(self._header(filename))

    def _header(self, filename: str) -> dict[str, TensorInfo]:
        if filename not in self._headers:
            self._headers[filename] = read_header(self._file(filename))
        return self._headers[filename]

    def _load_bin(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._bins:
            self._bins[filename] = load_bin(self._file(filename))
        return self._bins[filename]

    def info(self, name: str) -> TensorInfo:
        filename = self.weight_map.get(name)
        if filename is None:
            raise merge_failure(f"model '{self.ref}'", f"has no tensor {shown(name)}",
                                "check that the models share an architecture")
        if filename.endswith(".bin"):
            t = self._load_bin(filename).get(name)
            if t is None:
                raise merge_failure(str(self.folder / filename), f"no tensor {shown(name)}",
                                    "the index and the shard disagree; re-download")
            nbytes = t.numel() * t.element_size()
            return TensorInfo(name, st_code(t.dtype), tuple(t.shape), self._file(filename), 0,
                              nbytes)
        info = self._header(filename).get(name)
        if info is None:
            raise merge_failure(str(self.folder / filename), f"no tensor {shown(name)}",
                                "the index and the shard disagree; re-download")
        return info

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [start, end) of its first dimension."""
        filename = self.weight_map[name]
        if filename.endswith(".bin"):
            t = self._load_bin(filename)[name]
            return t if rows is None else t[rows[0]:rows[1]]
        return self._reader.read(self.info(name), rows)

    def read_array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """``read`` as a numpy array of the stored bytes; safetensors files only (see
        ``SafetensorsReader.read_array``)."""
        return self._reader.read_array(self.info(name), rows)

    def is_safetensors(self, name: str) -> bool:
        return not self.weight_map[name].endswith(".bin")

    def prefetch(self, name: str) -> None:
        """Start reading the tensor ``name`` from disk ahead of ``read`` (safetensors only)."""
        if not self.weight_map[name].endswith(".bin"):
            self._reader.prefetch(self.info(name))


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled checkpoint with torch's weights-only unpickler: code never runs."""
    import pickle

    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise merge_failure(
            str(path), f"refused to unpickle: it holds more than plain tensors ({shown(first)})",
            "only load checkpoints you trust, or convert them to safetensors") from None
    except Exception as exc:  # noqa: BLE001
        raise merge_failure(
            str(path), f"cannot load checkpoint ({type(exc).__name__}: {shown(str(exc))})",
            "the file is damaged; download it again") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(hasattr(v, "shape") for v in data.values()):
        raise merge_failure(str(path), "not a state dict of tensors", "check the checkpoint")
    return data


def open_model(
    ref: ModelReference, reader: SafetensorsReader, cache_dir: str | None
) -> ModelSource:
    """Open a local folder, or a hub model through the cache (small files first)."""
    if ref.is_local and ref.revision is None:
        folder = Path(ref.path)

        def fetch(filename: str) -> Path | None:
            p = folder / filename
            return p if p.is_file() else None

        return ModelSource(ref, folder, fetch, reader)

    from mergekit.io import hub

    folder = hub.fetch_small_files(ref, cache_dir)

    def fetch_hub(filename: str) -> Path | None:
        local = folder / filename
        if local.is_file():
            return local
        return hub.fetch_file(ref, filename, cache_dir)

    return ModelSource(ref, folder, fetch_hub, reader)
