"""Run mergekit-extract-lora: plan each weight (``extract_lora``), then one weight at a
time read both models' tensors, factor the changed matrices by truncated SVD, keep the
undecomposable ones whole, and write a peft adapter into a temporary folder moved into
place with its manifest, as a merge's output is. Nothing is resumed."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergekit.errors import usage_error
from mergekit.io import output_folder
from mergekit.io.dtypes import NUMPY_CODES, to_float32
from mergekit.io.manifest import MANIFEST, manifest, write_manifest
from mergekit.io.model import ModelSource, open_model
from mergekit.io.safetensors_file import SafetensorsReader
from mergekit.lora.adapter_out import ADAPTER_WEIGHTS, FILE_NAMES, AdapterOutput
from mergekit.lora.factor import factorize
from mergekit.refs import ModelReference, parse_model_reference
from mergekit.surgery.extract_lora import Options, WeightJob, plan_lines, plan_weights
from mergekit.version import __version__

log = logging.getLogger("mergekit")

OUTPUT_NAMES = (*FILE_NAMES, MANIFEST)


@dataclass(frozen=True)
class Request:
    """The command line, checked: what ``extract_lora`` does."""

    model: str
    base_model: str
    out: Path
    options: Options
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    seed: int = 0
    command: str = "mergekit-extract-lora"

    def record(self) -> dict[str, Any]:
        """The manifest's recipe: everything that changes the output."""
        o = self.options
        return {"extract_lora": {
            "model": self.model, "base_model": self.base_model, "max_rank": o.max_rank,
            "sv_epsilon": self.sv_epsilon, "distribute_scale": self.distribute_scale,
            "embed_lora": o.embed_lora, "skip_undecomposable": o.skip_undecomposable,
            "include_regex": o.include.pattern if o.include else None,
            "exclude_regex": o.exclude.pattern if o.exclude else None,
            "save_module": list(o.save_modules), "random_seed": self.seed}}


def extract_lora(req: Request, dry_run: bool = False, overwrite: bool = False,
                 quiet: bool = False, cache_dir: str | None = None) -> dict[str, str]:
    """Write the adapter into ``req.out`` (or with ``dry_run`` print the plan); returns what
    happened to each weight: ``lora r``, ``embedding lora r``, ``full``, ``skipped`` or
    ``unchanged``."""
    if req.options.max_rank < 1:
        raise usage_error("--max-rank", f"{req.options.max_rank} is below 1",
                          "give the largest rank of a LoRA factor, e.g. 128")
    if not req.sv_epsilon >= 0:
        raise usage_error("--sv-epsilon", f"{req.sv_epsilon} is negative",
                          "give 0 to keep every singular value up to --max-rank")
    reader = SafetensorsReader()
    try:
        model = open_model(_reference("--model", req.model), reader, cache_dir)
        base = open_model(_reference("--base-model", req.base_model), reader, cache_dir)
        jobs = plan_weights({n: model.info(n).shape for n in model.names},
                            {n: base.info(n).shape for n in base.names},
                            req.model, req.base_model, req.options)
        if dry_run:
            changed = {j.name: _changed(model, base, j) for j in jobs}
            print("\n".join(plan_lines(jobs, changed)))
            return {}
        made = {"recipe": req.record(), "options": {}}
        output_folder.check_output(req.out, [model.folder, base.folder], made, overwrite)
        adapter = AdapterOutput(req.base_model)
        done = _extract(model, base, jobs, adapter, req, quiet)
        if not adapter.ranks and not adapter.modules_to_save:
            raise usage_error(f"--model {req.model}", "no weight to extract: every weight "
                              "is unchanged or skipped", "check the models and the regexes")
        _write(req, adapter, model, base, made, overwrite)
    finally:
        reader.close()
    if not quiet:
        ranks = adapter.ranks
        log.info("%s: %d LoRA modules (rank %d to %d), %d modules_to_save, %d unchanged",
                 req.out, len(ranks), min(ranks.values(), default=0),
                 max(ranks.values(), default=0), len(adapter.modules_to_save),
                 sum(v == "unchanged" for v in done.values()))
    return done


def _reference(flag: str, text: str) -> ModelReference:
    """A local folder or a hub id; a path that is neither is refused before any download."""
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1
    if looks_local and not os.path.isdir(text):
        raise usage_error(f"{flag} {text}", "no such folder", "give a model folder or hub id")
    try:
        return parse_model_reference(text)
    except ValueError as exc:
        raise usage_error(flag, str(exc), "give a model folder or hub id") from None


def _float32(source: ModelSource, name: str) -> np.ndarray:
    info = source.info(name)
    if source.is_safetensors(name) and info.dtype in NUMPY_CODES:
        return to_float32(source.read_array(name), info.dtype)
    return source.read(name).float().numpy()


def _changed(model: ModelSource, base: ModelSource, job: WeightJob) -> bool:
    if job.action == "skipped":
        return False
    if model.info(job.name).shape != base.info(job.base_name).shape:
        return True
    return not np.array_equal(_float32(model, job.name), _float32(base, job.base_name))


def _extract(model: ModelSource, base: ModelSource, jobs: list[WeightJob],
             adapter: AdapterOutput, req: Request, quiet: bool) -> dict[str, str]:
    """Add each changed weight to ``adapter``. Whole modules first: a module with a changed
    bias (or one named by --save-module) keeps its weight whole too, since peft cannot
    both replace a module and add a LoRA to it."""
    from tqdm import tqdm

    done = {j.name: "skipped" for j in jobs if j.action == "skipped"}
    full_modules: set[str] = set()
    ordered = sorted((j for j in jobs if j.action != "skipped"),
                     key=lambda j: j.action != "full")
    for job in tqdm(ordered, desc="extracting", unit="weight", disable=quiet,
                    dynamic_ncols=True):
        tuned = _float32(model, job.name)
        if job.action != "full" and job.module not in full_modules:
            delta = tuned - _float32(base, job.base_name)
            del tuned
            if not delta.any():
                done[job.name] = "unchanged"
                continue
            if job.action == "embedding_lora":  # peft's embedding delta is (B @ A).T
                a, b = factorize(delta.T, req.options.max_rank, req.sv_epsilon,
                                 req.distribute_scale, req.seed)
                adapter.add_embedding(job.module, a, b)
                done[job.name] = f"embedding lora {a.shape[0]}"
            else:
                a, b = factorize(delta, req.options.max_rank, req.sv_epsilon,
                                 req.distribute_scale, req.seed)
                adapter.add_linear(job.module, a, b)
                done[job.name] = f"lora {a.shape[0]}"
            continue
        same = (tuned.shape == base.info(job.base_name).shape
                and np.array_equal(tuned, _float32(base, job.base_name)))
        if same and job.module not in full_modules:
            done[job.name] = "unchanged"
            continue
        adapter.add_full(job.name, tuned)
        full_modules.add(job.module)
        done[job.name] = "full"
    return done


def _write(req: Request, adapter: AdapterOutput, model: ModelSource, base: ModelSource,
           made: dict[str, Any], overwrite: bool) -> None:
    tmp = output_folder.make_temp(req.out, OUTPUT_NAMES)
    lock = output_folder.lock(tmp, req.out)
    try:
        with output_folder.writing(tmp / ADAPTER_WEIGHTS):
            adapter.write(tmp, _card(req, adapter))
        read = {req.model: set(model.weight_map.values()),
                req.base_model: set(base.weight_map.values())}
        sources = {req.model: model, req.base_model: base}
        with output_folder.writing(tmp / MANIFEST):
            write_manifest(tmp, manifest(__version__, req.record(), {}, sources, read, {}),
                           skip={output_folder.LOCK, output_folder.JOURNAL})
        output_folder.move_into_place(tmp, req.out, made, overwrite)
        lock.release(None)
    except BaseException:
        lock.release(tmp)
        output_folder.discard(tmp)
        raise


def _card(req: Request, adapter: AdapterOutput) -> str:
    ranks = adapter.ranks
    saved = ", ".join(f"`{m}`" for m in adapter.modules_to_save) or "none"
    return (f"---\nbase_model: {req.base_model}\nlibrary_name: peft\ntags:\n- mergekit\n"
            f"- peft\n- lora\n---\n\n# {req.out.name}\n\n"
            f"A LoRA adapter extracted by mergekit-extract-lora: the difference between "
            f"`{req.model}` and its base model `{req.base_model}`, each changed matrix "
            f"factored by truncated SVD.\n\n"
            f"- LoRA modules: {len(ranks)}, rank {min(ranks.values(), default=0)} to "
            f"{max(ranks.values(), default=0)} (at most {req.options.max_rank}); scaling 1\n"
            f"- replaced whole (modules_to_save): {saved}\n\n"
            f"Made with:\n\n```sh\n{req.command}\n```\n\n"
            f"Load it with `PeftModel.from_pretrained(base_model, \"{req.out.name}\")`.\n")
