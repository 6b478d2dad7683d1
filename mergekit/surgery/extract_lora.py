"""What mergekit-extract-lora does with each weight, decided from the two models' headers:
plain records, printed by --dry-run and carried out by ``extract_lora_run``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mergekit.architecture import embedding_name, is_head_name
from mergekit.errors import usage_error

Action = Literal["lora", "embedding_lora", "full", "skipped"]


@dataclass(frozen=True)
class WeightJob:
    """One weight of the fine-tuned model. ``base_name``: the base's tensor it is compared
    with (the embedding, for a head the base ties to it). ``action`` applies when the weight
    changed; an unchanged one is left out whatever its action."""

    name: str
    base_name: str
    module: str
    shape: tuple[int, ...]
    action: Action
    why: str


@dataclass(frozen=True)
class Options:
    max_rank: int
    embed_lora: bool
    skip_undecomposable: bool
    include: re.Pattern[str] | None
    exclude: re.Pattern[str] | None
    save_modules: tuple[str, ...]


def compile_regex(flag: str, text: str | None) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise usage_error(flag, f"{text!r} is not a regular expression ({exc})",
                          "check its syntax") from None


def module_of(name: str) -> str:
    return name.rpartition(".")[0] if name.endswith((".weight", ".bias")) else name


def plan_weights(model: Mapping[str, tuple[int, ...]], base: Mapping[str, tuple[int, ...]],
                 model_ref: str, base_ref: str, options: Options) -> list[WeightJob]:
    """One job per weight of the fine-tuned ``model`` (name -> shape). Refuses weights the
    base lacks and shapes that differ other than in the vocabulary (rows of the embedding
    or head)."""
    embed = embedding_name(model)
    base_embed = embedding_name(base)
    jobs = []
    for name, shape in model.items():
        base_name = name
        if name not in base:
            # the base ties its head to the embedding: compare the head with that
            if is_head_name(name) and base_embed is not None:
                base_name = base_embed
            else:
                raise usage_error(f"--model {model_ref}", f"has {name}, which the base model "
                                  f"{base_ref} lacks", "extract from a fine-tune of that base")
        jobs.append(_job(name, base_name, shape, base[base_name], name == embed, options))
    return jobs


def _job(name: str, base_name: str, shape: tuple[int, ...], base_shape: tuple[int, ...],
         is_embedding: bool, o: Options) -> WeightJob:
    module = module_of(name)

    def job(action: Action, why: str) -> WeightJob:
        return WeightJob(name, base_name, module, shape, action, why)

    def undecomposable(why: str) -> WeightJob:
        return job("skipped", why + "; --skip-undecomposable") if o.skip_undecomposable \
            else job("full", why)

    if o.exclude is not None and o.exclude.search(module):
        return job("skipped", "--exclude-regex")
    if o.include is not None and not o.include.search(module):
        return job("skipped", "not matched by --include-regex")
    vocab_change = (len(shape) == 2 == len(base_shape) and shape[1] == base_shape[1]
                    and (is_embedding or is_head_name(name)))
    if shape != base_shape and not vocab_change:
        raise usage_error(name, f"shape {list(shape)} in the model but {list(base_shape)} in "
                          "the base", "extract from a fine-tune of that base")
    if module in o.save_modules or module.rpartition(".")[2] in o.save_modules:
        return job("full", "--save-module")
    if shape != base_shape:
        return undecomposable(f"vocabulary {base_shape[0]} -> {shape[0]} rows")
    if len(shape) != 2 or not name.endswith(".weight"):
        return undecomposable(f"{len(shape)}-D")
    if is_embedding:
        return (job("embedding_lora", f"rank <= {o.max_rank}") if o.embed_lora
                else undecomposable("embedding without --embed-lora"))
    return job("lora", f"rank <= {o.max_rank}")


def plan_lines(jobs: list[WeightJob], changed: Mapping[str, bool]) -> list[str]:
    """--dry-run's lines: each weight and what happens to it."""
    lines = []
    for j in jobs:
        what = {"lora": "lora", "embedding_lora": "embedding lora",
                "full": "modules_to_save", "skipped": "skipped"}[j.action]
        if not changed[j.name] and j.action != "skipped":
            what, why = "unchanged", "left out"
        else:
            why = j.why
        lines.append(f"{j.name}  {list(j.shape)}  {what} ({why})")
    return lines
