"""The logit plug-in as one servable module: ``z = z_llm + β·(z_tuned − z_base)``.

The base proxy is rebuilt from the LLM's own parameters through the layer map (same tensors, no
copy); only tensors where the proxy differs from the LLM (a distilled proxy's blocks) are held
separately. The tuned proxy is the base proxy with the global LoRA adapter (PEFT) injected into the
proxy's own module objects, so the LLM's modules are never wrapped and its output is unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fedproxy_secure.errors import ModelError
from fedproxy_secure.models.blocks import decoder_blocks


def proxy_param_source(name: str, block_path: str, layer_map: Sequence[int]) -> str:
    """The LLM parameter name that proxy parameter ``name`` is cut from (blocks mapped by ``layer_map``)."""
    prefix = block_path + "."
    if name.startswith(prefix):
        j, rest = name[len(prefix):].split(".", 1)
        if not 0 <= int(j) < len(layer_map):
            raise ModelError(f"proxy parameter {name!r}: block {j} is outside the layer map {list(layer_map)}")
        return f"{prefix}{layer_map[int(j)]}.{rest}"
    return name


def check_layer_map(llm: nn.Module, layer_map: Sequence[int]) -> None:
    """ModelError unless ``layer_map`` is non-empty, unique and inside the LLM's blocks."""
    n_llm = len(decoder_blocks(llm)[1])
    bad = [l for l in layer_map if not 0 <= int(l) < n_llm]
    if not layer_map or bad or len(set(layer_map)) != len(layer_map):
        raise ModelError(f"fusion: layer map {list(layer_map)} must be unique LLM blocks; it points outside the LLM's "
                         f"{n_llm} blocks or repeats one (bad: {bad}); wrong LLM for this proxy?")


def _set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, param)


def build_shared_proxy(llm: nn.Module, proxy_config: Any, layer_map: Sequence[int],
                       own: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A proxy model whose parameters ARE the LLM's (mapped by ``layer_map``), except the ``own`` tensors.

    Guarantees: every proxy parameter not in ``own`` is the very ``nn.Parameter`` object of the LLM
    (no memory is added for it); shapes are checked (ModelError names the tensor). The proxy's
    modules are distinct objects from the LLM's, so wrapping them (LoRA) never changes the LLM.
    """
    from transformers import AutoModelForCausalLM

    own = dict(own or {})
    check_layer_map(llm, layer_map)
    block_path, _, _ = decoder_blocks(llm)
    with torch.device("cpu"):
        proxy = AutoModelForCausalLM.from_config(proxy_config, dtype=next(llm.parameters()).dtype)
    n = len(decoder_blocks(proxy)[1])
    if n != len(layer_map):
        raise ModelError(f"fused folder: proxy config has {n} blocks but the layer map {list(layer_map)} has {len(layer_map)}")
    llm_params = dict(llm.named_parameters(remove_duplicate=False))
    for name, p in list(proxy.named_parameters(remove_duplicate=False)):
        if name in own:
            t = own[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ModelError(f"fused folder: proxy tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            _set_param(proxy, name, nn.Parameter(t.to(p.dtype), requires_grad=False))
            continue
        src = proxy_param_source(name, block_path, layer_map)
        if src not in llm_params or tuple(llm_params[src].shape) != tuple(p.shape):
            raise ModelError(f"fused folder: proxy tensor {name!r} has no same-shape LLM tensor {src!r} and is not "
                             "stored in the folder; rebuild the fused folder")
        _set_param(proxy, name, llm_params[src])
    return proxy.eval()


def differing_tensors(llm: nn.Module, proxy: nn.Module, layer_map: Sequence[int]) -> dict[str, torch.Tensor]:
    """Proxy tensors that are NOT bit-identical to their LLM source (what a fused folder must store).

    An exact-copy proxy gives an empty dict; a distilled proxy gives its changed block tensors.
    """
    check_layer_map(llm, layer_map)
    block_path, _, _ = decoder_blocks(llm)
    llm_state = llm.state_dict()
    out = {}
    for name, t in proxy.state_dict().items():
        if name.endswith(".inv_freq") or name.endswith("rotary_emb.original_inv_freq"):
            continue
        src = proxy_param_source(name, block_path, layer_map)
        ref = llm_state.get(src)
        if ref is None or ref.shape != t.shape or ref.dtype != t.dtype or not torch.equal(ref, t):
            out[name] = t.detach().clone().contiguous()
    return out


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (shared tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _cache_arg(model: nn.Module) -> str:
    """The KV-cache keyword of the model's forward: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class FusedCache:
    """The KV caches of the fused module: the LLM's (B rows) and the proxy pair's (tuned rows, then base rows)."""

    def __init__(self, llm: Any, proxy: Any) -> None:
        self.llm, self.proxy = llm, proxy

    def batch_repeat_interleave(self, n: int) -> None:
        """Repeat every row ``n`` times in place (HF cache protocol; keeps tuned rows before base rows)."""
        for c in (self.llm, self.proxy):
            if c is not None:
                c.batch_repeat_interleave(n)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already cached (the LLM's count; the proxy's is the same)."""
        return int(self.llm.get_seq_length(layer_idx)) if self.llm is not None else 0


class FusedOutput(dict):
    """HF-style output: ``out.logits`` (and ``out["logits"]``); ``out.past_key_values`` / ``out.cache`` when cached."""

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]

    @property
    def past_key_values(self) -> FusedCache | None:
        return self.get("cache")

    @property
    def cache(self) -> FusedCache | None:
        return self.get("cache")


class FusedLogitModel(nn.Module):
    """LLM + β·(tuned proxy − base proxy) as one module; ``forward`` returns ``.logits`` at every position.

    ``proxy`` is a PEFT model over a proxy built by :func:`build_shared_proxy`; the base proxy is the
    same model with the adapter disabled (rows marked ``__base__`` in one mixed batch).
    """

    def __init__(self, llm: nn.Module, proxy: nn.Module, beta: float, tokenizer: Any = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not (0.0 <= float(beta) < float("inf")):
            raise ModelError(f"fused model: beta={beta} must be a finite number >= 0")
        v = {int(llm.get_output_embeddings().weight.shape[0]), int(proxy.get_output_embeddings().weight.shape[0])}
        if len(v) != 1:
            raise ModelError(f"fused model: vocabulary sizes differ {sorted(v)}; the proxy must share the LLM's tokenizer")
        self.llm, self.proxy, self.beta = llm.eval(), proxy.eval(), float(beta)
        self.tokenizer, self.fused_meta = tokenizer, dict(meta or {})

    def _fused(self, ids: torch.Tensor, mask: torch.Tensor, cache: FusedCache | None, use_cache: bool,
               position_ids: torch.Tensor | None = None, logits_to_keep: int = 0) -> tuple[torch.Tensor, FusedCache | None]:
        """Fused logits; the tuned and base proxy run as ONE batch (PEFT mixed-adapter rows), sharing weights."""
        kw: dict[str, Any] = {"attention_mask": mask, "use_cache": use_cache}
        if position_ids is not None:
            kw["position_ids"] = position_ids
        if logits_to_keep:
            kw["logits_to_keep"] = int(logits_to_keep)
        name = _cache_arg(self.llm)
        o_llm = self.llm(input_ids=ids, **{name: cache.llm if cache else None}, **kw)
        z = o_llm.logits.float()
        if self.beta == 0.0:
            return z, FusedCache(getattr(o_llm, name, None), None) if use_cache else None
        b = ids.shape[0]
        pkw = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        o_p = self.proxy(input_ids=torch.cat([ids, ids]), **{name: cache.proxy if cache else None},
                         adapter_names=[self.proxy.active_adapter] * b + ["__base__"] * b, **pkw)
        zp = o_p.logits.float()
        z = z + self.beta * (zp[:b] - zp[b:])
        return z, FusedCache(getattr(o_llm, name, None), getattr(o_p, name, None)) if use_cache else None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, past_key_values: FusedCache | None = None,
                cache: FusedCache | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                **_: Any) -> FusedOutput:
        """``logits = z_llm + β·(z_tuned − z_base)`` (float32, shape (B, T, V)); β = 0 gives the LLM's logits exactly.

        Follows the HF causal-LM call: ``attention_mask`` covers cached + new tokens, ``use_cache``
        returns a :class:`FusedCache` (``out.past_key_values``) to pass back, ``logits_to_keep=k``
        keeps the last k positions. Without a cache, the logits at every position equal the formula.
        """
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prev = cache if cache is not None else past_key_values
        if prev is not None and not isinstance(prev, FusedCache):
            raise ModelError("fused model: pass back the FusedCache this module returned (out.past_key_values)")
        z, new = self._fused(input_ids, mask, prev, bool(use_cache or prev is not None), position_ids, logits_to_keep)
        return FusedOutput(logits=z, cache=new) if new is not None else FusedOutput(logits=z)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """Decoding on the fused logits; returns prompt + new token ids (B, T + n).

        Takes Hugging Face ``generate`` arguments (:mod:`fedproxy_secure.fuse.generate_args`):
        ``max_new_tokens`` (default 32), ``max_length``, ``min_new_tokens``, ``do_sample`` with
        ``temperature``/``top_k``/``top_p`` (``generator`` seeds the draws), ``eos_token_id`` (id or
        list), ``pad_token_id``, ``use_cache``; ``num_beams=1`` and the other no-op values are
        accepted; any other argument or value is a ModelError naming it. Greedy by default.
        Rows may be left-padded (mask 0 on the left). With ``use_cache`` the three models keep
        their own KV caches; the tokens equal those of decoding on :meth:`forward`. Finished rows
        (EOS) are padded with ``pad_token_id`` (else the first EOS id); stops when every row has finished.
        """
        from fedproxy_secure.fuse.generate_args import next_tokens, parse_generate_kwargs

        opts = parse_generate_kwargs(kwargs)
        ids = input_ids
        max_new = opts.new_tokens(ids.shape[1])
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        eos = opts.eos_ids(self.tokenizer.eos_token_id if self.tokenizer is not None else None)
        pad = opts.pad_token_id if opts.pad_token_id is not None else (eos[0] if eos else None)
        eos_t = torch.tensor(eos, dtype=ids.dtype, device=ids.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache: FusedCache | None = None
        step_ids = ids
        for step in range(max_new):
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            if opts.use_cache:
                z, cache = self._fused(step_ids, mask, cache, True, pos[:, -step_ids.shape[1]:], logits_to_keep=1)
            else:
                z, _ = self._fused(ids, mask, None, False, pos, logits_to_keep=1)
            nxt = next_tokens(z[:, -1], opts, step=step, eos=eos, generator=generator)
            if eos:
                if pad is not None:
                    nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done = done | torch.isin(nxt, eos_t)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_ids = nxt[:, None]
            if eos and bool(done.all()):
                break
        return ids
