"""Build the tiny Llama models in examples/models/ (deterministic; run from the repo root).

    python examples/make_tiny_models.py [OUT_DIR]

Three models share one architecture (hidden 32, 4 layers, vocabulary 320) and one
byte-level BPE tokenizer trained on the sentences below:

- tiny-base: random weights (seed 0), the "pre-trained" model;
- tiny-instruct, tiny-code: tiny-base plus a small random delta (seeds 1 and 2), the
  "fine-tunes", so that task-vector methods (ties, ...) have something to work with.

The weights are drawn with torch's CPU generator directly, not through transformers'
initialisers, so the same torch gives the same bits whatever the transformers version.
Saved in bfloat16: all three fit in well under 1 MB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

VOCAB = 320
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as CONFIG says
CORPUS = [
    "Model merging combines the weights of several language models into one.",
    "A recipe names the models, the merge method and its parameters.",
    "Linear merging takes a weighted average of the tensors.",
    "SLERP interpolates along the sphere between two models.",
    "TIES keeps the largest changes and elects a sign for each weight.",
    "Passthrough stacks layers from different models into a deeper one.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "User: hello! Assistant: Hi, how can I help you today?",
]
MODELS = {"tiny-base": 0, "tiny-instruct": 1, "tiny-code": 2}
DELTA_STD = 0.01  # size of the "fine-tuning" change relative to the base weights


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", model_max_length=CONFIG["max_position_embeddings"],
    )


def portable_tokenizer_files(folder: Path) -> None:
    """Name the generic fast tokenizer class and write special_tokens_map.json, so that
    transformers 4.x loads the folder as well as 5.x."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def random_state(names_shapes: list[tuple[str, torch.Size]], seed: int,
                 std: float) -> dict[str, torch.Tensor]:
    """Normal(0, std) for matrices, 1 + Normal(0, std) for norm weights; sorted by name."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(names_shapes):
        x = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        state[name] = x + 1.0 if len(shape) == 1 and "norm" in name else x
    return state


def main(out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    if len(tokenizer) > VOCAB:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens, more than {VOCAB}")
    config = LlamaConfig(**CONFIG)
    model = LlamaForCausalLM(config)
    names_shapes = [(n, p.shape) for n, p in model.state_dict().items()]
    base = random_state(names_shapes, seed=0, std=0.02)
    for name, seed in MODELS.items():
        state = base
        if seed:
            delta = random_state(names_shapes, seed=seed, std=DELTA_STD)
            state = {k: v + delta[k] * (0.0 if "norm" in k else 1.0) for k, v in base.items()}
        model.load_state_dict(state)
        model.to(torch.bfloat16)
        folder = out_dir / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        portable_tokenizer_files(folder)
        model.to(torch.float32)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "models")
