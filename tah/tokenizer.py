"""Tokenizers: loading (local / hub / s3, cached), which tokenizer a checkpoint uses, the tokens that end
a generation, the chat prompt, and the conversation -> token ids + assistant mask rule.

Serving, evaluation and labelling all import these from here, so the same checkpoint is prompted and
stopped the same way everywhere.

The chat template renders a conversation. An assistant turn's span starts where the rendering of the
turns before it plus the generation prompt ends, and runs to the end of the first end-of-turn token
(the tokenizer's eos, e.g. <|im_end|>) after it, so the model learns to stop. Tokens whose characters
lie inside a span are assistant tokens (trained and labelled); everything else is prompt.

    python -c "from tah.tokenizer import load_tokenizer, tokenize_chat, shipped_tokenizer; \
               t = load_tokenizer(shipped_tokenizer()); \
               print(tokenize_chat(t, [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]))"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import storage
from .assets import shipped_tokenizer

_TOKENIZERS: dict[str, Any] = {}


def checkpoint_tokenizer(model_path: str, override: str | None = None) -> str:
    """The tokenizer directory for a checkpoint: `override`, else the checkpoint's own, else the
    shipped task's (training writes checkpoints without one)."""
    if override:
        return override
    local = storage.local_copy(model_path)
    if Path(local, "tokenizer_config.json").exists():
        return local
    return shipped_tokenizer()


def load_tokenizer(path: str) -> Any:
    """AutoTokenizer from a local dir, hub id or s3:// prefix, cached per process."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(storage.local_copy(path))
    return _TOKENIZERS[path]


def end_token_ids(tokenizer: Any, model_path: str | None = None) -> list[int]:
    """The tokens that end a generation: the tokenizer's eos and the checkpoint's
    `generation_config.json` eos_token_id(s) (Qwen3 chat models stop on <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if model_path is not None:
        cfg = Path(storage.local_copy(model_path), "generation_config.json")
        if cfg.is_file():
            gen = json.loads(cfg.read_text()).get("eos_token_id")
            ids |= set(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return sorted(int(i) for i in ids)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation rendered with the generation prompt (what the model continues)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class MalformedSample(ValueError):
    """A sample that cannot be used; `reason` is one of openr1.MALFORMED_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of the assistant turns."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        if not full.startswith(prefix):
            raise MalformedSample("template_not_prefix", "the chat template renders earlier turns differently")
        start = len(prefix)
        end = full.find(eos, start) if eos else -1
        spans.append((start, end + len(eos) if end >= 0 else len(full)))
    return full, spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]],
                  max_response_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a conversation; raises MalformedSample when unusable."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in offsets]
    n_resp = sum(mask)
    if n_resp == 0:
        raise MalformedSample("empty_assistant", "no assistant token after tokenization")
    if max_response_tokens is not None and n_resp > max_response_tokens:
        raise MalformedSample("too_long", f"{n_resp} response tokens > {max_response_tokens}")
    return ids, mask
