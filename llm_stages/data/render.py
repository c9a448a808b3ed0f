"""Records -> token ids and labels.

SFT: a conversation is rendered with the tokenizer's chat template (any template: see template.py)
and every token is known to come from a prompt segment (label -100) or an assistant reply (label =
token, up to and including the end-of-turn token; the template's newline after it stays masked).
PT: documents are tokenized, EOS appended to each, concatenated and cut into fixed blocks.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from llm_stages.data.reward_sequence import reply_end, reward_sequence
from llm_stages.data.template import render_text, reply_spans, template_messages
from llm_stages.errors import ConfigError

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


class PairExample(NamedTuple):
    chosen: Example  # prompt + chosen reply; only the reply is labelled
    rejected: Example
    index: int = -1  # position in its split, so cached reference log-probs can be looked up
    margin: float = 0.0  # how much better chosen is, when the data says (reward-model margin)


def render_pair(tokenizer, prompt: list[dict], chosen: dict | str, rejected: dict | str,
                tools: list[dict] | None = None) -> PairExample:
    """Prompt + each reply (an assistant message, or its text), only the reply trained; each row is
    the sequence a reward model scores (llm_stages.data.reward_sequence), as RL scores its replies."""
    end = reply_end(tokenizer)

    def render(reply) -> Example:
        message = reply if isinstance(reply, dict) else {"role": "assistant", "content": reply}
        example = render_conversation(tokenizer, prompt + [message], tools=tools, train_last_only=True)
        start = prompt_length(example.labels)
        ids = reward_sequence(example.input_ids[:start], example.input_ids[start:], end)
        return Example(ids, (example.labels + [IGNORE_INDEX] * len(ids))[:len(ids)])

    return PairExample(render(chosen), render(rejected))


def prompt_length(labels) -> int:
    """Tokens before the first labelled one (a pair's shared prompt)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def truncate_pair(pair: PairExample, max_length: int, max_prompt_length: int) -> tuple[PairExample, bool]:
    """Fit both sequences in `max_length`: the shared prompt is cut from the left to
    `max_prompt_length` (keeping its last turns), then replies from the right."""
    n_prompt = prompt_length(pair.chosen.labels)
    longest = max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
    if longest <= max_length:
        return pair, False
    keep_prompt = min(n_prompt, max_prompt_length)

    def cut(e: Example) -> Example:
        p = prompt_length(e.labels)
        ids, labels = e.input_ids[p - keep_prompt:], e.labels[p - keep_prompt:]
        return Example(ids[:max_length], labels[:max_length])

    return pair._replace(chosen=cut(pair.chosen), rejected=cut(pair.rejected)), True


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def truncate(example: Example, max_length: int) -> Example:
    """Cut from the right to `max_length` tokens."""
    return Example(example.input_ids[:max_length], example.labels[:max_length])


class PromptExample(NamedTuple):
    """An RL prompt: rendered up to the assistant's turn, ready for generation."""

    input_ids: list[int]
    prompt: str  # the last user message, for rule rewards
    answer: str | None  # reference answer, when the data has one


def render_prompt(tokenizer, messages: list[dict], answer: str | None, tools: list[dict] | None = None) -> PromptExample:
    text = render_text(tokenizer, *template_messages(tokenizer, messages, tools), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return PromptExample(ids, messages[-1]["content"], answer)


def num_trained_tokens(labels: list[int]) -> int:
    """Tokens that contribute to the loss: labels after the shift (the first position predicts nothing)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def pack_documents(documents: list[list[int]], eos_id: int, block_size: int, remainder: str = "drop") -> list[Example]:
    """Concatenate documents, each followed by EOS, and cut the stream into `block_size` blocks.

    remainder="drop" drops the final partial block (as the seeds and HF run_clm do);
    remainder="pad" keeps it (the collator right-pads it and masks the padding).
    Attention is not masked across document boundaries inside a block (standard packed PT).
    """
    if remainder not in ("drop", "pad"):
        raise ConfigError(f"datamodule.remainder must be 'drop' or 'pad', got {remainder!r}")
    stream: list[int] = []
    for doc in documents:
        stream += doc
        stream.append(eos_id)
    n_full = len(stream) // block_size
    blocks = [stream[k * block_size:(k + 1) * block_size] for k in range(n_full)]
    if remainder == "pad" and len(stream) % block_size:
        blocks.append(stream[n_full * block_size:])
    return [Example(block, list(block)) for block in blocks]


class PackedExample(NamedTuple):
    """Several whole examples in one row; `doc_lengths` lets the collator restart positions and
    confine attention to each example (no leakage across examples)."""

    input_ids: list[int]
    labels: list[int]
    doc_lengths: list[int]


def pack_examples(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Greedy packing in the given order: an example joins the current row while it fits."""
    rows: list[PackedExample] = []
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for e in examples:
        if lengths and len(ids) + len(e.input_ids) > max_length:
            rows.append(PackedExample(ids, labels, lengths))
            ids, labels, lengths = [], [], []
        ids, labels, lengths = ids + list(e.input_ids), labels + list(e.labels), lengths + [len(e.input_ids)]
    if lengths:
        rows.append(PackedExample(ids, labels, lengths))
    return rows
