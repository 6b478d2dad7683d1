"""What decides an output's bytes, as its manifest records it (tool version, recipe, the
options that change the result, the inputs' files), and the part of it that decides the
shards: a resumed merge keeps finished shards only while that part is unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergekit.config import MergeConfiguration, recipe_to_plain
from mergekit.io.manifest import manifest
from mergekit.io.model import ModelSource
from mergekit.methods.registry import get_method
from mergekit.options import MergeOptions
from mergekit.plan import MergePlan
from mergekit.version import __version__

# recipe fields that decide only the files beside the weights: a rerun that changes them
# keeps the finished shards
ARTIFACT_FIELDS = ("tokenizer_source", "tokenizer", "chat_template")


def output_provenance(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    options: MergeOptions,
) -> dict[str, Any]:
    """The manifest without the shards' sha256: what decides the output's bytes."""
    read: dict[str, set[str]] = {}
    for job in plan.jobs:
        refs = [(r.model, r.name) for r in job.inputs + ((job.base,) if job.base else ())]
        for model, name in refs + list(job.row_names):  # row_names: rows gathered by token
            read.setdefault(model, set()).add(sources[model].weight_map[name])
    made = made_by(config, plan, options)
    record = manifest(__version__, made["recipe"], made["options"], sources, read, {},
                      options.hash_inputs)
    del record["shards"]
    return record


def made_by(config: MergeConfiguration, plan: MergePlan,
            options: MergeOptions) -> dict[str, Any]:
    """The manifest's ``recipe`` and ``options`` records: the recipe and the options that
    change the output's bytes. An earlier output with other ones is replaced only with
    --overwrite."""
    result_options: dict[str, object] = {"out_shard_size": options.out_shard_size}
    if options.lora_out is not None:
        result_options["lora_out"] = options.lora_out
    if get_method(plan.method).random:
        result_options["random_seed"] = options.random_seed
    return {"recipe": recipe_to_plain(config), "options": result_options}


def shards_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance less the recipe fields that do not decide the shards' bytes."""
    recipe = {k: v for k, v in provenance["recipe"].items() if k not in ARTIFACT_FIELDS}
    return {**provenance, "recipe": recipe}
