"""Model loading (local Hugging Face folders), tiny test models, and decoder-block discovery."""

from fedproxy_secure.models.blocks import decoder_blocks, set_decoder_blocks
from fedproxy_secure.models.loading import count_parameters, load_causal_lm, load_tokenizer, weights_hash
from fedproxy_secure.models.tiny import build_tiny_model, byte_tokenizer

__all__ = [
    "build_tiny_model",
    "byte_tokenizer",
    "count_parameters",
    "decoder_blocks",
    "load_causal_lm",
    "load_tokenizer",
    "set_decoder_blocks",
    "weights_hash",
]
