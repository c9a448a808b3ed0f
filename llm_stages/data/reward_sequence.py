"""The sequence a reward model scores, built from (prompt, reply) in one place: RM training and
validation rows (`render_pair`), RL scoring of sampled replies (`rollout.Scorer`), and so what the
RM export reads when anyone scores `apply_chat_template(prompt + [reply])` with it.

It is the prompt, the reply up to and including its first end-of-turn token, and the text the
chat template writes after that token (ChatML: the newline after `<|im_end|>`), right-padded. A
reward model (AutoModelForSequenceClassification) reads its score at the last token that is not
padding, so at the template's last token — also when the pad token is the EOS token, which
`load_tokenizer` makes it for tokenizers without a pad token. A reply that never ended (cut at
max_new_tokens or max_length) is scored as it stands.
"""

from __future__ import annotations

from typing import NamedTuple

from llm_stages.data.template import turn_end


class ReplyEnd(NamedTuple):
    eos_ids: tuple[int, ...]  # tokens that end a reply
    suffix_ids: tuple[int, ...]  # what the chat template writes after a reply's end-of-turn token


def reply_end(tokenizer, eos_ids: list[int] | None = None) -> ReplyEnd:
    """How replies end under `tokenizer`'s chat template: the ids that end a reply (default: the
    template's end-of-turn token, else the tokenizer's EOS) and the template's tokens after the
    end-of-turn token of a final assistant turn (from the template's probe, `template.turn_end`)."""
    end = turn_end(tokenizer)
    terminator = end.terminator or tokenizer.eos_token or ""
    if not eos_ids:
        eos_ids = [tokenizer.convert_tokens_to_ids(terminator) if terminator else tokenizer.eos_token_id]
    after = end.after
    suffix = after[after.index(terminator) + len(terminator):] if terminator and terminator in after else ""
    return ReplyEnd(tuple(eos_ids), tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else ())


def reward_sequence(prompt_ids: list[int], reply_ids: list[int], end: ReplyEnd) -> list[int]:
    """Prompt + reply through its first EOS + the template's suffix after it (when the reply ended)."""
    reply_ids = list(reply_ids)
    first_eos = next((i for i, token in enumerate(reply_ids) if token in end.eos_ids), None)
    if first_eos is None:
        return list(prompt_ids) + reply_ids
    return list(prompt_ids) + reply_ids[:first_eos + 1] + list(end.suffix_ids)
