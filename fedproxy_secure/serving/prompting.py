"""Prompt text and stop strings: the chat template (or the plain one), cutting at a stop, safe stream prefixes.

Pure functions of text; nothing here touches a model or the network.
"""

from __future__ import annotations

from typing import Any

from fedproxy_secure.serving.requests import ChatMessage

#: the prompt used for chat when the tokenizer has no chat template (documented in docs/serving.md)
PLAIN_TEMPLATE_DOC = "one line '<role>: <content>' per message, then 'assistant:' (the model continues after it)"


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The prompt text for ``messages``: the tokenizer's chat template (with the generation prompt)
    when it has one, else the plain template (:data:`PLAIN_TEMPLATE_DOC`)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``(text before the earliest stop string, True)``, or ``(text, False)`` when none occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def safe_stream_prefix(text: str, stops: list[str]) -> str:
    """The longest prefix of ``text`` that can be sent while streaming: it ends before any suffix of
    ``text`` that could still grow into a stop string, and before a trailing incomplete character."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    out = text[:keep]
    return out.rstrip("\ufffd") if out.endswith("\ufffd") else out
