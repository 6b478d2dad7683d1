"""Recipe + input headers -> the merge plan: one frozen record per output tensor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit.architecture import (
    LayerLayout,
    embedding_name,
    find_layers,
    is_head_name,
)
from mergekit.config import MergeConfiguration, Parameters
from mergekit.errors import usage_error
from mergekit.io.dtypes import FLOAT_CODES, NAME_TO_ST, itemsize
from mergekit.io.model import ModelSource
from mergekit.io.safetensors_file import TensorInfo
from mergekit.methods.registry import Method, get_method
from mergekit.parameters import (
    ModelLevels,
    foreign_parameters,
    method_params,
    misplaced_globals,
    unusual_values,
)
from mergekit.printable import printable
from mergekit.refs import parse_model_reference
from mergekit.vocab_plan import VocabPlan, plan_vocabulary


@dataclass(frozen=True)
class TensorRef:
    model: str  # model key, as the recipe names it
    name: str


@dataclass(frozen=True)
class TensorJob:
    output_name: str
    method: str
    inputs: tuple[TensorRef, ...]  # the non-base inputs, in recipe order
    base: TensorRef | None
    params: Mapping[str, Any]  # resolved values; per-model ones as tuples aligned to inputs
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the saved tensor
    shard: int  # index into MergePlan.shard_files
    layer: int | None  # output layer index, None outside the layers
    compute: bool = True  # False: a non-float tensor, copied from the base or first input
    # embedding and head rows permuted into the output vocabulary (``vocab_plan.py``), and
    # every model's tensor for it, by model key
    rows: VocabPlan | None = None
    row_names: tuple[tuple[str, str], ...] = ()
    adapted: tuple[str, ...] = ()  # the models whose input is changed by their LoRA adapter

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class MergePlan:
    method: str
    jobs: tuple[TensorJob, ...]
    shard_files: tuple[str, ...]
    num_layers: int
    config_model: str  # whose config.json (and default tokenizer) the output takes
    layer_origins: tuple[tuple[str, int], ...]  # per output layer: (model, source layer)
    read_bytes: int
    warnings: tuple[str, ...] = field(default=())
    vocab: VocabPlan | None = None

    @property
    def write_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass(frozen=True)
class _Source:
    model: str
    start: int
    end: int
    params: Parameters | None
    where: str  # YAML path of the source


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    base: str | None
    params: Parameters | None
    where: str


class _Planner:
    def __init__(
        self,
        config: MergeConfiguration,
        sources: Mapping[str, ModelSource],
        shard_bytes: int,
        allow_crimes: bool,
        random_seed: int | None = None,
        tokenizer_folder: Path | None = None,
    ) -> None:
        self.cfg = config
        self.tokenizer_folder = tokenizer_folder
        self.vocab: VocabPlan | None = None
        self.random_seed = random_seed
        self.sources = sources
        self.shard_bytes = shard_bytes
        self.method: Method = get_method(config.merge_method)
        self.layouts = {k: find_layers(s.names, s.config) for k, s in sources.items()}
        self.imp = {
            str(parse_model_reference(k)): v
            for k, v in (config.input_model_parameters or {}).items()
        }
        self.warnings: list[str] = []
        self.out_dtype = NAME_TO_ST[config.output_dtype] if config.output_dtype else None
        if not allow_crimes:
            self._check_architectures()
        self.warnings.extend(foreign_parameters(self.method, config))
        self.warnings.extend(misplaced_globals(self.method, config))
        self.warnings.extend(unusual_values(self.method, config))

    # -- structure -------------------------------------------------------------

    def _check_architectures(self) -> None:
        def names(config: dict[str, Any]) -> tuple[str, ...]:
            value = config.get("architectures")
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            return ()  # missing or malformed: unknown

        archs = {k: names(s.config) for k, s in self.sources.items()}
        if len(set(archs.values())) > 1:
            listing = ", ".join(f"{k}: {'/'.join(a) or '?'}" for k, a in archs.items())
            raise usage_error("models", f"the architectures differ ({listing})",
                              "merge models of one architecture, or pass --allow-crimes")

    def _slices(self) -> list[_Slice]:
        cfg = self.cfg
        base = str(cfg.base_model) if cfg.base_model else None
        if cfg.models is not None:
            counts = {str(m.model): self.layouts[str(m.model)].num_layers for m in cfg.models}
            if base and self.method.base != "unused":
                counts.setdefault(base, self.layouts[base].num_layers)
            if len(set(counts.values())) > 1:
                listing = ", ".join(f"{k}: {n}" for k, n in counts.items())
                raise usage_error("models", f"the models have different layer counts ({listing})",
                                  "use slices to choose matching layer ranges")
            n = next(iter(counts.values()))
            srcs = [_Source(str(m.model), 0, n, m.parameters, f"models[{i}]")
                    for i, m in enumerate(cfg.models)]
            if base and self.method.base != "unused" and base not in [s.model for s in srcs]:
                srcs.append(_Source(base, 0, n, None, "base_model"))
            return [_Slice(tuple(srcs), base, None, "models")]
        out = []
        for i, s in enumerate(cfg.slices or []):
            sbase = str(s.base_model) if s.base_model else base
            srcs = tuple(
                _Source(str(src.model), src.layer_range[0], src.layer_range[1], src.parameters,
                        f"slices[{i}].sources[{j}]")
                for j, src in enumerate(s.sources)
            )
            for src in srcs:
                n = self.layouts[src.model].num_layers
                if src.end > n:
                    raise usage_error(
                        f"{src.where}.layer_range", f"[{src.start}, {src.end}] is past the {n} "
                        f"layers of {src.model}", f"use an end of at most {n}")
            out.append(_Slice(srcs, sbase, s.parameters, f"slices[{i}]"))
        return out

    def _split(self, sl: _Slice) -> tuple[_Source | None, list[_Source]]:
        """(base source or None, the other inputs) for this slice and method."""
        if self.method.base == "unused" or sl.base is None:
            return None, list(sl.sources)
        base = next((s for s in sl.sources if s.model == sl.base), None)
        return base, [s for s in sl.sources if s is not base]

    # -- parameters --------------------------------------------------------------

    def _params(
        self, sl: _Slice, inputs: list[_Source], tensor: str, t: float
    ) -> dict[str, Any]:
        per_model = [
            ModelLevels(src.model, src.where,
                        (src.params, sl.params, self.imp.get(src.model), self.cfg.parameters))
            for src in inputs
        ]
        seed = tensor_seed(self.random_seed, tensor) if self.method.random else None
        return method_params(self.method, per_model, (sl.params, self.cfg.parameters),
                             tensor, t, seed)

    # -- one output tensor -------------------------------------------------------

    def _input_name(self, src: _Source, name: str) -> str | None:
        """The name of ``name`` in this source's model (tied heads use the embedding)."""
        model = self.sources[src.model]
        if name in model.weight_map:
            return name
        if is_head_name(name) and model.config.get("tie_word_embeddings", True):
            return embedding_name(model.names)
        return None

    def _job(
        self, out_name: str, sl: _Slice, names: dict[str, str], t: float, layer: int | None
    ) -> dict[str, Any]:
        base_src, inputs = self._split(sl)
        infos: dict[str, TensorInfo] = {}
        for src in ([base_src] if base_src else []) + inputs:
            infos[src.model] = self.sources[src.model].info(names[src.model])
        ref = infos[base_src.model] if base_src else infos[inputs[0].model]
        vocab = self.vocab if layer is None and self._vocab_tensor(out_name) else None
        row_names: tuple[tuple[str, str], ...] = ()
        if vocab is not None:
            shape = (vocab.size, *ref.shape[1:])
            widths = {k: i.shape[1:] for k, i in infos.items()}
            if len(set(widths.values())) > 1:
                shape = self._shape(out_name, infos, ref, False)  # raises: widths differ
            row_names = tuple((m, self._model_tensor(m, out_name)) for m in vocab.maps)
        else:
            shape = self._shape(out_name, infos, ref, layer is None)
        compute = ref.dtype in FLOAT_CODES
        dtype = self.out_dtype if (compute and self.out_dtype) else ref.dtype
        return dict(
            output_name=out_name,
            method=self.method.name,
            inputs=tuple(TensorRef(s.model, names[s.model]) for s in inputs),
            base=TensorRef(base_src.model, names[base_src.model]) if base_src else None,
            params=self._params(sl, inputs, out_name, t) if compute else {},
            shape=shape,
            dtype=dtype,
            layer=layer,
            compute=compute,
            rows=vocab if compute else None,
            row_names=row_names if compute else (),
            adapted=tuple(m for m, n in names.items() if self._adapted(m, n)),
        )

    def _adapted(self, model: str, name: str) -> bool:
        adapted = getattr(self.sources[model], "adapted", None)  # model+adapter inputs
        return bool(adapted and adapted(name))

    def _vocab_tensor(self, name: str) -> bool:
        """Whether the output tensor ``name`` has a row per token (embedding or head)."""
        return is_head_name(name) or name == self.embed_name

    def _model_tensor(self, model: str, name: str) -> str:
        """The tensor of ``model`` for the output's embedding or head ``name``."""
        found = self._input_name(_Source(model, 0, 0, None, model), name)
        if found is None and not is_head_name(name):
            found = embedding_name(self.sources[model].names)
        if found is None:
            raise usage_error(f"model {model}", f"has no tensor for {name}",
                              "merge models of one architecture")
        return found

    def _plan_vocabulary(self, config_model: str) -> VocabPlan | None:
        models = [str(r) for r in self.cfg.referenced_models()]
        rows = {}
        for m in models:
            embed = embedding_name(self.sources[m].names)
            if embed is None:
                return None  # not a language model: no rows per token
            rows[m] = self.sources[m].info(embed).shape[0]
        source = self.cfg.vocabulary_source
        folders = {m: self.sources[m].folder for m in models}
        if source not in (None, "union", "base"):
            source = str(parse_model_reference(source))
        external = self.tokenizer_folder if source not in (None, "union", "base") and \
            source not in folders else None
        return plan_vocabulary(
            source=source, block=self.cfg.tokenizer, models=models,
            base=str(self.cfg.base_model) if self.cfg.base_model else None,
            config_model=config_model, folders=folders, rows=rows, source_folder=external)

    def _shape(
        self, name: str, infos: dict[str, TensorInfo], ref: TensorInfo, outside_layers: bool
    ) -> tuple[int, ...]:
        shapes = {k: i.shape for k, i in infos.items()}
        if len(set(shapes.values())) == 1:
            return ref.shape
        listing = ", ".join(f"{k}: {list(s)}" for k, s in shapes.items())
        # only the vocabulary (first) dimension of embeddings and heads may differ
        rest = {(len(s), s[1:]) for s in shapes.values()}
        if not outside_layers or len(rest) > 1 or next(iter(rest))[0] not in (1, 2):
            raise usage_error(name, f"the input shapes differ ({listing})",
                              "merge models of the same size, or pick matching layers")
        if self.method.shape_policy == "base":
            out = ref.shape
        else:
            out = tuple(min(dims) for dims in zip(*shapes.values()))
        self.warnings.append(f"{name}: input shapes differ ({listing}); output is {list(out)}")
        return out

    def _names(self, sl: _Slice, name_of: Any) -> dict[str, str]:
        names = {}
        for src in sl.sources:
            n = name_of(src)
            if n is None:
                raise usage_error(src.where, f"model {src.model} has no tensor matching "
                                  f"{name_of(sl.sources[0])}",
                                  "merge models whose tensor names match")
            names[src.model] = n
        return names

    # -- the whole plan ------------------------------------------------------------

    def build(self) -> MergePlan:
        slices = self._slices()
        config_model = (
            str(self.cfg.base_model) if self.cfg.base_model else slices[0].sources[0].model
        )
        out_layout = self.layouts[config_model]
        self.embed_name = embedding_name(self.sources[config_model].names)
        self.vocab = self._plan_vocabulary(config_model)
        if self.vocab is not None:
            self.warnings.extend(self.vocab.warnings)
        raw: list[dict[str, Any]] = []
        first, last = slices[0], slices[-1]

        def ref_layout(sl: _Slice) -> tuple[_Source, LayerLayout]:
            base_src, inputs = self._split(sl)
            src = base_src or inputs[0]
            return src, self.layouts[src.model]

        def extra(sl: _Slice, which: str) -> None:
            _, layout = ref_layout(sl)
            for name in getattr(layout, which):
                names = self._names(sl, lambda s, n=name: self._input_name(s, n))
                raw.append(self._job(name, sl, names, 0.0, None))

        extra(first, "pre")
        origins: list[tuple[str, int]] = []
        for sl in slices:
            ref_src, layout = ref_layout(sl)
            n = ref_src.end - ref_src.start
            for i in range(n):
                k = len(origins)
                origins.append((ref_src.model, ref_src.start + i))
                t = i / (n - 1) if n > 1 else 1.0
                for suffix in layout.layer_suffixes[ref_src.start + i]:
                    def name_of(s: _Source, i: int = i, suffix: str = suffix) -> str | None:
                        n = self.layouts[s.model].layer_name(s.start + i, suffix)
                        return n if n in self.sources[s.model].weight_map else None

                    names = self._names(sl, name_of)
                    prefix = out_layout.prefix or layout.prefix
                    raw.append(self._job(f"{prefix}.{k}.{suffix}", sl, names, t, k))
        extra(last, "post")
        if out_layout.num_layers == 0 and origins:
            raise usage_error(config_model, "no layers found in its tensor names",
                              "is this a transformers language model?")

        jobs, shard_files = self._assign_shards(raw)
        seen: set[tuple[str, str]] = set()
        read_bytes = 0
        for job in jobs:
            for ref in job.inputs + ((job.base,) if job.base else ()):
                if (ref.model, ref.name) not in seen:
                    seen.add((ref.model, ref.name))
                    read_bytes += self.sources[ref.model].info(ref.name).nbytes
        return MergePlan(self.method.name, tuple(jobs), shard_files, len(origins),
                         config_model, tuple(origins), read_bytes, tuple(self.warnings),
                         self.vocab)

    def _assign_shards(
        self, raw: list[dict[str, Any]]
    ) -> tuple[list[TensorJob], tuple[str, ...]]:
        shard, used = 0, 0
        assigned = []
        for r in raw:
            nbytes = math.prod(r["shape"]) * itemsize(r["dtype"])
            if used and used + nbytes > self.shard_bytes:
                shard, used = shard + 1, 0
            used += nbytes
            assigned.append(TensorJob(shard=shard, **r))
        count = shard + 1
        if count == 1:
            files: tuple[str, ...] = ("model.safetensors",)
        else:
            files = tuple(f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count))
        return assigned, files


def build_plan(
    config: MergeConfiguration,
    sources: Mapping[str, ModelSource],
    shard_bytes: int = 5 * 1000**3,
    allow_crimes: bool = False,
    random_seed: int | None = None,
    tokenizer_folder: Path | None = None,
) -> MergePlan:
    """``tokenizer_folder``: where a ``tokenizer_source`` that is not a model of the recipe
    was fetched to."""
    return _Planner(config, sources, shard_bytes, allow_crimes, random_seed,
                    tokenizer_folder).build()


def tensor_seed(random_seed: int | None, tensor: str) -> int:
    """The random stream of one output tensor: derived from the run's seed (0 when unset)
    and the tensor's name, so results depend on neither tensor order nor device."""
    import hashlib

    digest = hashlib.sha256(f"{random_seed or 0}:{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def format_plan(plan: MergePlan, full: bool = False) -> str:
    """The plan for --dry-run, one line per output tensor: its shape, dtype, method, inputs
    and resolved recipe parameters, and its shard where there are several. ``full``: also
    what the engine sets itself (the per-tensor seed, fields of the prepare pass) and the
    shard of a single-file output: every field that decides the output's bytes, for the
    resume fingerprint. The tensor names come from the inputs' headers, so their control
    characters and line breaks are escaped."""
    recipe_params = {name: {p.name for p in get_method(name).params}
                     for name in {job.method for job in plan.jobs}}
    show_shard = full or len(plan.shard_files) > 1
    lines = []
    for job in plan.jobs:
        def ref(r: TensorRef, job: TensorJob = job) -> str:
            return f"{r.model}:{r.name}" + (" (lora)" if r.model in job.adapted else "")

        ins = ", ".join(ref(r) for r in job.inputs)
        base = f" base={ref(job.base)}" if job.base else ""
        params = " ".join(f"{k}={_fmt(v)}" for k, v in job.params.items()
                          if full or k in recipe_params[job.method])
        shard = f" shard={job.shard + 1}" if show_shard else ""
        how = job.method if job.compute else "copy"
        if job.rows is not None:  # rows gathered by token: the map decides the bytes too
            how += f" rows-by-token={job.rows.digest()}" if full else " rows-by-token"
        lines.append(printable(
            f"{job.output_name} {list(job.shape)} {job.dtype}{shard} {how} "
            f"[{ins}]{base} {params}".rstrip()
        ))
    lines.append("")
    if plan.vocab is not None:
        lines.extend(plan.vocab.summary)
    lines.append(
        f"{len(plan.jobs)} tensors, {plan.num_layers} layers, {len(plan.shard_files)} shard(s); "
        f"read {_size(plan.read_bytes)}, write {_size(plan.write_bytes)}"
    )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
