"""Find the stack of decoder blocks of a causal LM, generically, and replace it."""

from __future__ import annotations

from torch import nn

from fedproxy_secure.errors import ModelError

# (attribute path to the block list, config key holding the layer count), most specific first.
_KNOWN = (
    ("model.layers", "num_hidden_layers"),  # Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM
    ("transformer.h", "n_layer"),  # GPT-2, GPT-J, Falcon(h)
    ("gpt_neox.layers", "num_hidden_layers"),  # GPT-NeoX, Pythia
    ("model.decoder.layers", "num_hidden_layers"),  # OPT
)


def _get(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, str]:
    """Return ``(path, blocks, layer_count_key)`` for a causal LM, or raise ModelError.

    Guarantees: ``blocks`` is the model's own ModuleList (edits affect the model) and every block
    maps hidden states of shape (B, T, H) to the same shape.
    """
    for path, key in _KNOWN:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks, key
    arch = type(model).__name__
    raise ModelError(
        f"model: cannot find the decoder block list of architecture {arch}; supported: Llama-family "
        "(model.layers), GPT-2-family (transformer.h), GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers)"
    )


def set_decoder_blocks(model: nn.Module, keep: list[int]) -> None:
    """Keep only blocks ``keep`` (sorted, original order) in place and update the config's layer count."""
    path, blocks, key = decoder_blocks(model)
    if sorted(set(keep)) != list(keep) or not keep or keep[-1] >= len(blocks) or keep[0] < 0:
        raise ModelError(f"compress: kept block indices {keep} must be sorted, unique and within 0..{len(blocks) - 1}")
    parent_path, _, attr = path.rpartition(".")
    parent = _get(model, parent_path)
    new = nn.ModuleList([blocks[i] for i in keep])
    for j, block in enumerate(new):  # attention layers carry their index for the KV cache
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j
    setattr(parent, attr, new)
    setattr(model.config, key, len(keep))
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        model.config.layer_types = [layer_types[i] for i in keep]
