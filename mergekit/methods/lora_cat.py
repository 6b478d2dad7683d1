"""LoRA cat: adapters of one base model combined by concatenating their factors (peft's
``add_weighted_adapter`` with ``combination_type="cat"``): A = [A_1; ...; A_n],
B = [w_1 s_1 B_1, ..., w_n s_n B_n], of rank the sum of theirs, exact, with no SVD. The
merge writes that adapter (``lora_out.py``); as a full model, and for tensors an adapter
replaces whole, its result is the base plus the weighted sum of the adapters' changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergekit.methods.registry import MethodParams, PerModelFloat, register

if TYPE_CHECKING:
    import torch


class LoraCatParams(MethodParams):
    weight: PerModelFloat = Field(1.0, description="weight of this adapter's change")


@register("lora_cat", LoraCatParams, base="required", elementwise=True, arrays=True)
def lora_cat(tensors: list[torch.Tensor], base: torch.Tensor | None, params: LoraCatParams):
    """LoRA cat (adapters of one base concatenated; the output is an adapter)

    https://huggingface.co/docs/peft/main/en/package_reference/lora
    """
    out = base * 1.0  # a new array or tensor, numpy or torch
    for w, x in zip(params.weight, tensors):
        out += (x - base) * w
    return out
