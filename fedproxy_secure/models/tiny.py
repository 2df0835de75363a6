"""Tiny randomly initialised Llama / GPT-2 models and a byte-level tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedproxy_secure.config import TinyModelSpec

_SPECIALS = ["<pad>", "<s>", "</s>"]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 tokens): any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.padding_side = "right"
    return fast


def build_tiny_model(spec: TinyModelSpec) -> nn.Module:
    """A randomly initialised causal LM of the given shape (deterministic in ``spec.seed``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    if spec.arch == "llama":
        cfg = LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
            max_position_embeddings=spec.max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=spec.vocab, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
            n_inner=spec.intermediate, n_positions=spec.max_positions, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )
        model = GPT2LMHeadModel(cfg)
    return model.eval()


def save_tiny_llm(spec: TinyModelSpec, out: str | Path) -> Path:
    """Write a tiny model and its byte tokenizer as a normal HF folder (safetensors)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_model(spec).save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    return out
