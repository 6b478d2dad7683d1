"""PEFT LoRA adapters of tiny models with random factors (not peft's zero B), and the
merged weights of an output folder."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from safetensors.torch import load_file


def make_adapter(model_dir: Path, out: Path, seed: int, **config: object) -> dict:
    """A peft LoRA adapter of ``model_dir`` with random factors (and random
    modules_to_save); returns merge_and_unload()'s state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def merged(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
