"""The output's files besides the weights, from the recipe and the plan: the tokenizer to
copy, the output's config.json, the model card and the recipe, as the plain data that
``io/artifacts.py`` checks and writes."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergekit.architecture import embedding_name
from mergekit.config import MergeConfiguration
from mergekit.errors import usage_error
from mergekit.io import artifacts
from mergekit.io.card import model_card
from mergekit.io.dtypes import ST_DTYPES
from mergekit.io.model import ModelSource
from mergekit.io.vocab import union_tokenizer
from mergekit.methods.registry import get_method
from mergekit.options import MergeOptions
from mergekit.plan import MergePlan
from mergekit.refs import ModelReference, parse_model_reference

log = logging.getLogger("mergekit")


def resolve_output_artifacts(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    out: Path,
    options: MergeOptions,
) -> artifacts.Artifacts:
    """The output's files besides the weights, resolved and checked."""
    generation = sources[plan.config_model].side_file(artifacts.GENERATION_CONFIG)
    tokenizer = None
    tokenizer_texts: dict[str, str] = {}
    if options.copy_tokenizer:
        folder = _tokenizer_folder(config, plan, sources, options)
        tokenizer = artifacts.tokenizer_files(folder)
        if plan.vocab is not None and plan.vocab.new_tokens:
            tokenizer_texts = union_tokenizer(folder, plan.vocab.new_tokens)
        if not tokenizer and config.vocabulary_source is not None:
            raise usage_error("tokenizer_source", f"{folder} holds no tokenizer files",
                              "name a model that has a tokenizer (tokenizer.json, "
                              "tokenizer_config.json, ...)")
        if not tokenizer:
            log.warning("no tokenizer files found in %s; the output has no tokenizer", folder)
    recipe_yaml = config.to_yaml()
    return artifacts.resolve_artifacts(
        config=merged_config(plan, sources),
        recipe_yaml=recipe_yaml,
        generation_config=generation,
        tokenizer=tokenizer,
        tokenizer_texts=tokenizer_texts,
        chat_template=config.chat_template,
        input_folders=[s.folder for s in sources.values()],
        card=_card(config, recipe_yaml, out.name) if options.write_model_card else None,
    )


def merged_config(plan: MergePlan, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    """config.json of the output: the plan's config model's, with the layer count and
    per-layer types of the plan, the dtype of most of its merged tensors and the rows of its
    embedding as the vocabulary size."""
    float_codes = Counter(j.dtype for j in plan.jobs if j.compute)
    dtype = ST_DTYPES[float_codes.most_common(1)[0][0]][0] if float_codes else None
    embed = embedding_name(j.output_name for j in plan.jobs)
    job = next((j for j in plan.jobs if j.output_name == embed), None)
    return artifacts.output_config(
        sources[plan.config_model].config,
        plan.num_layers,
        [(sources[m].config, i) for m, i in plan.layer_origins],
        torch_dtype=dtype,
        vocab_size=job.shape[0] if job is not None and job.shape else None,
    )


def _card(config: MergeConfiguration, recipe_yaml: str, name: str) -> str:
    method = get_method(config.merge_method)
    return model_card(name, recipe_yaml=recipe_yaml, method_name=method.name,
                      method_display_name=method.display_name, paper=method.reference,
                      base_model=config.base_model, models=config.referenced_models())


def _tokenizer_folder(
    config: MergeConfiguration,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    options: MergeOptions,
) -> Path:
    """The folder whose tokenizer the output copies (fetched from the hub if need be)."""
    if plan.vocab is not None:
        return plan.vocab.tokenizer_folder
    choice = config.vocabulary_source
    if choice is None or choice == "union":  # a union of one vocabulary is that vocabulary
        return sources[plan.config_model].folder
    external = external_tokenizer_folder(config, sources, options)
    if external is not None:
        return external
    ref: ModelReference = config.base_model if choice == "base" else parse_model_reference(
        choice)  # type: ignore[assignment]
    return sources[str(ref)].folder


def external_tokenizer_folder(config: MergeConfiguration, sources: Mapping[str, ModelSource],
                              options: MergeOptions) -> Path | None:
    """The folder of a tokenizer source that is not a model of the recipe (fetched from
    the hub if need be), or None."""
    choice = config.vocabulary_source
    if choice in (None, "base", "union"):
        return None
    ref = parse_model_reference(choice)
    if str(ref) in sources:
        return None
    if ref.is_local:
        return Path(ref.path)
    from mergekit.io import hub

    return hub.fetch_small_files(ref, options.transformers_cache)
