"""Messages -> token ids and labels, the rendering every record kind shares (each kind's own
rendering is in `llm_stages/data/kinds/`).

A conversation is rendered with the tokenizer's chat template (any template: see template.py) and
every token is known to come from a prompt segment (label -100) or an assistant reply (label =
token, through the end-of-turn token and the template's newline after it, as TRL trains and scores
replies).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from llm_stages.data.template import reply_spans

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# For tokenizers without a chat template (base models): plain "Human:/Assistant:" turns, each reply
# ending in the tokenizer's EOS. Prefix-stable, so assistant tokens can be located exactly.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{%- elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] + '\n' }}"
    "{%- elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}"
    "{%- else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ 'Assistant: ' }}{%- endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one (it is saved with the export, so
    inference renders prompts the same way). Returns whether it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    log.warning("the tokenizer has no chat template; using the default Human:/Assistant: template")
    return True


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`system_prompt`, when set, replaces the conversation's own system turns (data.system_prompt)."""
    if not system_prompt:
        return messages
    return [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]


class Example(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; the next-token shift happens in the loss


class Rendered(NamedTuple):
    """A record rendered for training: the example, or why the record was dropped (counted as
    `<split>_dropped_<dropped>`); `truncated` when it was cut to fit (counted as `<split>_truncated`)."""

    example: tuple | None  # the kind's example (Example, PairExample, PromptExample); None when dropped
    truncated: bool = False
    dropped: str | None = None


def render_conversation(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
                        train_last_only: bool = False) -> Example:
    """Token ids of `messages` through the chat template, with only assistant replies trained (only
    the final reply with `train_last_only`, as preference stages score it alone; never a turn
    marked `train: False`). Turns after the last assistant reply are not rendered.

    The conversation is rendered once, as the template renders it (so templates that are not
    prefix-stable, like Qwen3's, train on what they show); `template.reply_spans` finds each reply
    in that text, and the text is tokenized piece by piece at the span edges, as generation would
    see it: the prompt up to the assistant header, then the reply.
    """
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    messages = messages[: last_reply + 1]
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)
               and (not train_last_only or i == last_reply)]
    text, spans = reply_spans(tokenizer, messages, tools, trained)
    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in spans:
        prompt_ids, reply_ids = _encode(tokenizer, text[position:start]), _encode(tokenizer, text[start:end])
        input_ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids
        position = end
    tail = _encode(tokenizer, text[position:])
    return Example(input_ids + tail, labels + [IGNORE_INDEX] * len(tail))


def prompt_length(labels) -> int:
    """Tokens before the first labelled one (a pair's shared prompt)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def truncate(example: Example, max_length: int) -> Example:
    """Cut from the right to `max_length` tokens."""
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def num_trained_tokens(labels: list[int]) -> int:
    """Tokens that contribute to the loss: labels after the shift (the first position predicts nothing)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)
