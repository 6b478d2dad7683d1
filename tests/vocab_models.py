"""Tiny models with real tokenizers of the three kinds (byte-level BPE, SentencePiece-style
Unigram, WordPiece), built offline, with added tokens of one's choosing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# plain vocabulary tokens shared by every kind (besides each kind's own alphabet)
WORDS = ["hello", "world", "merge", "model", "token", "the", "a", "of", "and", "to"]


def build_tokenizer(kind: str, extra_words: Sequence[str] = (),
                    added: Sequence[str] = (), special: Sequence[str] = ()):
    """A ``PreTrainedTokenizerFast`` of ``kind`` ('bpe', 'unigram', 'wordpiece') whose
    vocabulary is its base alphabet, ``WORDS`` and ``extra_words``; ``special`` and
    ``added`` are added tokens (special or not), in that order, after the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS) + [w for w in extra_words if w not in WORDS]
    if kind == "bpe":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {c: i for i, c in enumerate(sorted(alphabet))}
        merges = []
        for w in words:  # each word one token, merged left to right from its bytes
            token = w[0]
            for c in w[1:]:
                if token + c not in vocab:
                    merges.append((token, c))
                    vocab[token + c] = len(vocab)
                token += c
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        unk = None
    elif kind == "unigram":
        pieces = [("<unk>", 0.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
        pieces += [("▁" + w, -1.0) for w in words]
        tok = Tokenizer(models.Unigram(pieces, unk_id=0))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        unk = "<unk>"
    elif kind == "wordpiece":
        entries = dict.fromkeys(["[UNK]", "[CLS]", "[SEP]", "[PAD]"] + list(
            "abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
            + words)  # "a" is a letter and a word: one id
        vocab = {t: i for i, t in enumerate(entries)}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        unk = "[UNK]"
    else:
        raise ValueError(kind)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk)
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    if added:
        fast.add_tokens(list(added))
    return fast


def build_vocab_model(path: Path, seed: int, kind: str = "bpe", extra_words: Sequence[str] = (),
                      added: Sequence[str] = (), special: Sequence[str] = (),
                      tied: bool = False, extra_rows: int = 0, layers: int = 2) -> Path:
    """A random tiny Llama in ``path`` with a ``kind`` tokenizer (see ``build_tokenizer``)
    and one embedding row per token, plus ``extra_rows`` rows that no token uses."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(kind, extra_words, added, special)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + extra_rows, num_hidden_layers=layers,
                      tie_word_embeddings=tied, hidden_size=16, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
