"""Hugging Face ``generate()`` arguments for the fused logit model: what is honoured, what is refused by name.

:class:`~fedproxy_secure.fuse.served.FusedLogitModel` is not a ``PreTrainedModel``, yet callers pass it
the arguments they pass to ``transformers``' ``generate``. Guarantees of :func:`parse_generate_kwargs`:

- honoured: ``max_new_tokens`` (default 32), ``max_length`` (prompt + new; ``max_new_tokens`` wins when
  both are given, as in transformers), ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_k``
  (default 50, as in transformers; 0 = off), ``top_p``, ``eos_token_id`` (an id or a list of ids),
  ``pad_token_id``, ``use_cache``; ``temperature``/``top_k``/``top_p`` act only with ``do_sample=True``
  (greedy decoding ignores them, as transformers does);
- accepted only at their no-op value (:data:`NEUTRAL`, e.g. ``num_beams=1``); any other value is a
  :class:`~fedproxy_secure.errors.ModelError` naming the argument;
- refused by name whatever the value: :data:`REFUSED` (objects that would change decoding in ways this
  module cannot honour) and any argument it does not know.

Nothing is silently dropped: an argument is either applied, at its neutral value, or refused.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from pydantic import Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

from fedproxy_secure.errors import ModelError
from fedproxy_secure.strict import StrictModel

#: new tokens when neither ``max_new_tokens`` nor ``max_length`` is given
DEFAULT_MAX_NEW_TOKENS = 32

#: transformers arguments accepted only at these values (the fused model decodes one sequence per row)
NEUTRAL: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0, "early_stopping": False,
    "min_p": None, "penalty_alpha": None, "bad_words_ids": None, "force_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "output_scores": False, "output_logits": False, "output_attentions": False,
    "output_hidden_states": False, "return_dict_in_generate": False, "renormalize_logits": False,
    "low_memory": None, "streamer": None,
}

#: transformers arguments refused whatever their value, with the fix
REFUSED: dict[str, str] = {
    "generation_config": "pass its fields (max_new_tokens, do_sample, temperature, top_p, ...) as keyword arguments",
    "logits_processor": "not supported by the fused logit model; use temperature/top_k/top_p",
    "stopping_criteria": "not supported by the fused logit model; use eos_token_id or max_new_tokens",
    "prefix_allowed_tokens_fn": "constrained decoding is not supported by the fused logit model",
    "assistant_model": "assisted decoding is not supported by the fused logit model",
    "synced_gpus": "not supported by the fused logit model",
    "negative_prompt_ids": "not supported by the fused logit model",
}


class GenerateOptions(StrictModel):
    """The honoured arguments, validated (strict types: ``do_sample="yes"`` is refused, not coerced)."""

    max_new_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    max_length: Optional[StrictInt] = Field(default=None, ge=1)
    min_new_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    do_sample: StrictBool = False
    temperature: Optional[Union[StrictFloat, StrictInt]] = None
    top_k: Optional[StrictInt] = Field(default=None, ge=0)
    top_p: Optional[Union[StrictFloat, StrictInt]] = None
    eos_token_id: Union[StrictInt, list[StrictInt], None] = None
    pad_token_id: Optional[StrictInt] = None
    use_cache: StrictBool = True

    @model_validator(mode="after")
    def _sampling_values(self) -> "GenerateOptions":
        # like transformers, the sampling knobs are only checked when sampling: temperature=0 with greedy is fine
        if self.do_sample:
            if self.temperature is not None and not 0.0 < float(self.temperature) < float("inf"):
                raise ValueError(f"temperature={self.temperature} must be a finite number > 0 when do_sample=True "
                                 "(use do_sample=False for greedy decoding)")
            if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
                raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        return self

    def new_tokens(self, prompt_len: int) -> int:
        """New tokens to generate for a prompt of ``prompt_len`` tokens (``max_new_tokens`` first)."""
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        if self.max_length is not None:
            return max(0, int(self.max_length) - int(prompt_len))
        return DEFAULT_MAX_NEW_TOKENS

    def eos_ids(self, default: int | None) -> list[int]:
        """The end-of-sequence ids (``eos_token_id`` as a list, else ``[default]``, else none)."""
        if self.eos_token_id is None:
            return [] if default is None else [int(default)]
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def parse_generate_kwargs(kwargs: dict[str, Any]) -> GenerateOptions:
    """Validate ``generate()`` keyword arguments (see the module docstring); ModelError naming the argument."""
    honoured: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in REFUSED:
            raise ModelError(f"generate: argument {name!r} is refused: {REFUSED[name]}")
        if name in NEUTRAL:
            neutral = NEUTRAL[name]
            if value is not None and value != neutral:
                raise ModelError(f"generate: {name}={value!r} is not supported by the fused logit model (it decodes "
                                 f"one sequence per row, greedily or by sampling); leave {name} at {neutral!r}")
            continue
        if name not in GenerateOptions.model_fields:
            raise ModelError(f"generate: unknown argument {name!r}; the fused logit model takes "
                             f"{', '.join(GenerateOptions.model_fields)} (and 'generator' for seeded sampling)")
        honoured[name] = value
    try:
        return GenerateOptions.model_validate(honoured)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(arguments)"
        raise ModelError(f"generate: {field}: {err['msg']}") from None


def next_tokens(logits: torch.Tensor, opts: GenerateOptions, *, step: int, eos: list[int],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row from its last-position ``logits`` (B, V): argmax, or a sample with
    ``temperature``, ``top_k`` and ``top_p`` applied in transformers' order. Before ``min_new_tokens``
    new tokens, the EOS ids cannot be chosen. Pure, except for the draw from ``generator``."""
    z = logits.float().clone()
    if opts.min_new_tokens and step < int(opts.min_new_tokens):
        for e in eos:
            if 0 <= e < z.shape[-1]:
                z[:, e] = float("-inf")
    if not opts.do_sample:
        return z.argmax(-1)
    if opts.temperature is not None:
        z = z / float(opts.temperature)
    k = 50 if opts.top_k is None else int(opts.top_k)
    if 0 < k < z.shape[-1]:
        kth = torch.topk(z, k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if opts.top_p is not None and float(opts.top_p) < 1.0:
        srt, idx = torch.sort(z, descending=True, dim=-1)
        probs = torch.softmax(srt, dim=-1)
        drop = probs.cumsum(-1) - probs > float(opts.top_p)  # the mass before a token already covers top_p
        drop[:, 0] = False  # always keep the most likely token
        z = z.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(-1)
