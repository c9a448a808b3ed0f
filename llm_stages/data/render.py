"""Records -> token ids and labels.

SFT: a conversation is rendered with the tokenizer's chat template one turn at a time, so every
token is known to come from a prompt segment (label -100) or an assistant reply (label = token,
up to and including the end-of-turn/EOS token; the template's newline after it stays masked).
PT: documents are tokenized, EOS appended to each, concatenated and cut into fixed blocks.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from llm_stages.data.reward_sequence import reply_end, reward_sequence
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


def render_conversation(tokenizer, messages: list[dict], *, train_last_only: bool = False) -> Example:
    """Token ids of `messages` through the chat template, with only assistant replies trained
    (only the final reply with `train_last_only`, as preference stages score it alone).

    Turns after the last assistant reply are not rendered: there is nothing to learn from them.
    Needs a template whose rendering of a conversation prefix is a prefix of the whole rendering
    (true of ChatML/Qwen/Llama/SmolLM templates); others are refused with a clear error.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (train_last_only and i != last_reply):
            continue
        prompt = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
        full = _apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ConfigError(
                "the tokenizer's chat template does not render conversations prefix-stably, so "
                "assistant tokens cannot be located; set a ChatML-style template on the tokenizer")
        prompt_ids = _encode(tokenizer, prompt[len(rendered):])
        reply_ids = _encode(tokenizer, full[len(prompt):])
        input_ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + _reply_labels(reply_ids, tokenizer.eos_token_id)
        rendered = full
    return Example(input_ids, labels)


class PairExample(NamedTuple):
    chosen: Example  # prompt + chosen reply; only the reply is labelled
    rejected: Example
    index: int = -1  # position in its split, so cached reference log-probs can be looked up
    margin: float = 0.0  # how much better chosen is, when the data says (reward-model margin)


def render_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str) -> PairExample:
    end = reply_end(tokenizer)

    def render(reply: str) -> Example:
        example = render_conversation(tokenizer, prompt + [{"role": "assistant", "content": reply}], train_last_only=True)
        # The row a reward model trains on is the sequence RL scores (llm_stages.data.reward_sequence).
        start = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
        ids = reward_sequence(example.input_ids[:start], example.input_ids[start:], end)
        return Example(ids, (example.labels + [IGNORE_INDEX] * len(ids))[:len(ids)])

    return PairExample(render(chosen), render(rejected))


def truncate_pair(pair: PairExample, max_length: int, max_prompt_length: int) -> tuple[PairExample, bool]:
    """Fit both sequences in `max_length`: the shared prompt is cut from the left to
    `max_prompt_length` (keeping its last turns), then replies from the right."""
    def split(e: Example) -> int:  # prompt length: tokens before the first labelled one
        return next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels))

    n_prompt = split(pair.chosen)
    longest = max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
    if longest <= max_length:
        return pair, False
    keep_prompt = min(n_prompt, max_prompt_length)

    def cut(e: Example) -> Example:
        p = split(e)
        ids, labels = e.input_ids[p - keep_prompt:], e.labels[p - keep_prompt:]
        return Example(ids[:max_length], labels[:max_length])

    return pair._replace(chosen=cut(pair.chosen), rejected=cut(pair.rejected)), True


def _reply_labels(reply_ids: list[int], eos_id: int | None) -> list[int]:
    """Train the reply up to and including its last EOS; template text after it stays masked."""
    if eos_id is None or eos_id not in reply_ids:
        return list(reply_ids)
    end = len(reply_ids) - reply_ids[::-1].index(eos_id)
    return list(reply_ids[:end]) + [IGNORE_INDEX] * (len(reply_ids) - end)


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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


def render_prompt(tokenizer, messages: list[dict], answer: str | None) -> PromptExample:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
