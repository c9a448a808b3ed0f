"""Where the assistant's replies are in a chat template's rendering — for any template.

A conversation is rendered once, exactly as the template renders it; each trained reply is then
located in that text:

- templates with `{% generation %}` blocks say so themselves (transformers' assistant mask);
- for the others, the reply is rendered a second time with a marker in place of the message, and
  the two texts differ exactly where the template put the reply (whatever it does around it: Qwen3
  adds `<think></think>` only to the last turn, Gemma trims, tool calls become `<tool_call>` markup).

A span starts where the generation prompt ends (what a model writes after `<|im_start|>assistant\\n`,
including a template's empty think block) and ends after the template's end-of-turn token
(`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, ...), found once per template from a probe
conversation, and the text the template writes right after that token (ChatML: the newline after
`<|im_end|>`). TRL trains and scores that text as part of the reply (SFT's completion mask, DPO's
completion log-probs), so spans include it: losses and log-probs then equal TRL's on the same data.
"""

from __future__ import annotations

import json
import logging
import re
from typing import NamedTuple

from llm_stages.errors import ConfigError

log = logging.getLogger(__name__)

MARKER = "\ue000"  # a private-use character: no real reply contains it
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_turn_ends: dict[tuple, "TurnEnd"] = {}


def template_messages(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list | None]:
    """Messages (and tools) as this template can show them. What a template does not render is
    written into text rather than lost: tool calls as `<tool_call>` JSON (the Hermes/Qwen markup),
    reasoning as `<think>...</think>` before the reply, tool schemas as a system turn."""
    source = str(getattr(tokenizer, "chat_template", "") or "")
    reads = {name: name in source for name in ("tool_calls", "reasoning_content", "tools")}
    reads["reasoning_content"] = reads["reasoning_content"] or "reasoning" in source or "thinking" in source
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if k not in ("train", "in_prompt") and v is not None}
        if message.get("tool_calls") and not reads["tool_calls"]:
            calls = "\n".join(f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                              for c in message.pop("tool_calls"))
            message["content"] = f"{message['content']}\n{calls}" if message["content"] else calls
        if message.get("reasoning_content") and not reads["reasoning_content"]:
            message["content"] = f"<think>\n{message.pop('reasoning_content')}\n</think>\n\n{message['content']}"
        if message["role"] == "tool" and "tool" not in source:
            message["role"] = "user"  # a template without a tool role would drop or refuse the output
        out.append(message)
    if tools and not reads["tools"]:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        text = f"You can call these tools:\n{listing}"
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
        tools = None
    return out, tools


def render_text(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (already adapted by `template_messages`)."""
    if not messages and not add_generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception (e.g. "roles must alternate") and template errors
        raise ConfigError(f"the tokenizer's chat template cannot render this conversation: {e} "
                          f"(roles: {[m['role'] for m in messages]})") from None


def reply_spans(tokenizer, messages: list[dict], tools: list[dict] | None,
                trained: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each reply in `trained` (indices of
    assistant messages), in order."""
    adapted, tools = template_messages(tokenizer, messages, tools)
    shift = len(adapted) - len(messages)  # the tools' system turn, put first when the template cannot show them
    messages, trained = adapted, [i + shift for i in trained]
    text = render_text(tokenizer, messages, tools)
    regions = _generation_regions(tokenizer, messages, tools, text, trained)
    end_of_turn = turn_end(tokenizer)
    spans, previous_end = [], 0
    for i in trained:
        region_start, region_end = regions[i] if regions else _marker_region(tokenizer, messages, tools, text, i)
        prompt = render_text(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        # The reply starts where the generation prompt ends, when the conversation so far renders
        # as a prefix of the whole (else at the reply's own text).
        start = len(prompt) if prompt and text.startswith(prompt) and previous_end <= len(prompt) <= region_end \
            else region_start
        spans.append((start, _through_turn_end(text, start, region_end, end_of_turn)))
        previous_end = spans[-1][1]
    return text, spans


def _through_turn_end(text: str, start: int, end: int, turn: "TurnEnd") -> int:
    """The end of a reply: through the end-of-turn token right after it (or, when the region already
    holds that token, its last one), then through the template's text after that token when the
    text continues with it (ChatML's newline), or through its leading whitespace (Phi-3 writes
    "\\n" + EOS after a final reply, only "\\n" after the others)."""
    terminator = turn.terminator
    if not terminator:
        return end
    last = text.rfind(terminator, start, end)
    if last >= 0 and not text[last + len(terminator):end].strip():
        position = last + len(terminator)
    else:
        gap = len(text[end:]) - len(text[end:].lstrip())
        if not text.startswith(terminator, end + gap):
            return end
        position = end + gap + len(terminator)
    suffix = turn.suffix
    if suffix and text.startswith(suffix, position):
        return position + len(suffix)
    newline = len(suffix) - len(suffix.lstrip())  # mid-conversation some templates write only the newline
    return position + newline if newline and text.startswith(suffix[:newline], position) else position


def _marker_region(tokenizer, messages, tools, text: str, i: int) -> tuple[int, int]:
    """Where message `i` lies in `text`: render again with a marker in place of its text (keeping its
    reasoning, which templates write before the text; then without it) and diff the two renderings.
    Tool calls are left out of the marker message, so their markup falls inside the difference."""
    kept = {k: v for k, v in messages[i].items() if k != "tool_calls"}
    for marker_message in ({**kept, "content": MARKER}, {"role": "assistant", "content": MARKER}):
        probe = render_text(tokenizer, messages[:i] + [marker_message] + messages[i + 1:], tools)
        prefix = _common_prefix(text, probe)
        suffix = min(_common_prefix(text[::-1], probe[::-1]), len(probe) - prefix, len(text) - prefix)
        if probe[prefix:len(probe) - suffix] == MARKER:
            return prefix, len(text) - suffix
    raise ConfigError(f"the chat template does not render assistant message {i} as a unit of text, so its "
                      "reply tokens cannot be located; use a template with {% generation %} blocks")


def _generation_regions(tokenizer, messages, tools, text: str, trained: list[int]) -> dict[int, tuple[int, int]] | None:
    """Assistant message index -> its `{% generation %}` block, when the template has them and
    marks every assistant message once; else None (the marker method is used)."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if not trained or not _GENERATION_TAG.search(template):
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, indices = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=tokenizer.get_chat_template(None, tools),
            return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    except Exception:
        return None
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    blocks = [b for b in indices[0] if b[1] > b[0]]
    if rendered[0] != text or len(blocks) != len(assistants):
        return None
    return dict(zip(assistants, blocks))


class TurnEnd(NamedTuple):
    terminator: str  # the special token that ends an assistant turn, as the model writes it ("" when none)
    after: str  # all the template writes after a final assistant reply (ChatML: "<|im_end|>\n")

    @property
    def suffix(self) -> str:
        """What the template writes after the end-of-turn token (ChatML: "\n"; "" when no token)."""
        if not self.terminator or self.terminator not in self.after:
            return ""
        return self.after[self.after.index(self.terminator) + len(self.terminator):]


def turn_end(tokenizer) -> TurnEnd:
    """How this template ends an assistant turn, from one probe conversation rendered once per
    tokenizer and template: the first special token after the reply, and everything after it."""
    key = (id(tokenizer), len(tokenizer), str(getattr(tokenizer, "chat_template", "")))
    if key not in _turn_ends:
        try:
            text = render_text(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARKER}])
            after = text[text.index(MARKER) + len(MARKER):]
        except (ConfigError, ValueError):
            after = tokenizer.eos_token or ""
        specials = [t for t in _special_tokens(tokenizer) if t and t in after]
        first = min(specials, key=lambda t: (after.index(t), -len(t)), default="")
        if first and after[:after.index(first)].strip():
            first = ""  # text between the reply and the token: not a plain end-of-turn
        if not first:
            log.warning("the chat template ends an assistant turn with no special token: replies are trained "
                        "without an end-of-turn token, so generation will not learn when to stop")
        _turn_ends[key] = TurnEnd(first, after)
    return _turn_ends[key]


def _special_tokens(tokenizer) -> list[str]:
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


def _common_prefix(a: str, b: str) -> int:
    """The length of the common prefix, by bisection over slice comparisons (C speed on long texts)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
