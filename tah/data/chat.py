"""Chat formatting: a conversation -> token ids and the per-token assistant mask.

The tokenizer's own chat template renders the conversation. An assistant turn's span starts where
the rendering of the turns before it plus the generation prompt ends, and runs to the end of the
first end-of-turn token (the tokenizer's eos, e.g. <|im_end|>) after it, so the model learns to stop.
Tokens whose characters lie inside a span are assistant tokens (trained and labelled); everything
else (system, user, template) is prompt.

    python -c "from transformers import AutoTokenizer; from tah.data.chat import tokenize_chat; \
               t = AutoTokenizer.from_pretrained('data/tinytask/tokenizer'); \
               print(tokenize_chat(t, [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]))"
"""

from __future__ import annotations

from typing import Any


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
