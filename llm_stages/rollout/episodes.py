"""Multi-turn episodes: the policy generates until it calls a tool or ends its reply; each call's
result is appended as the chat template's tool turn, and the policy goes on, until a turn without a
call, `max_turns`, `max_tool_calls`, or a token limit.

Token-exact. The policy's tokens are kept exactly as sampled, never decoded and encoded again (a
template's text can tokenize differently from what was sampled); the tokens an environment adds
are the template's own rendering of the tool turn, cut where the sampled turn ended
(`observation_tokens`), and appended to the ids. In the `Sample` an episode becomes,
`response_mask` marks the policy's tokens (the only ones that count in the loss, KL, entropy,
advantages and values) and `observation_mask` the environment's; the log-probs of the ratio are
those of exactly the tokens sampled.

Failures are text for the model, not crashes: an unparsable call, an unknown tool, wrong arguments,
a tool that raises or runs past `tool_timeout` all become the tool turn's content (counted per
episode). An environment (`rollout.environment`, TRL's `environment_factory` protocol) is created
per episode and `reset(**record)` from the prompt's data record; a string it returns is appended
to the last user message; its public methods are tools (llm_stages.rollout.tools).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llm_stages.data.kinds.prompt import PromptBatch, render_prompt
from llm_stages.data.template import render_text, template_messages, turn_end
from llm_stages.errors import ConfigError
from llm_stages.rollout.sampling import Sample
from llm_stages.rollout.tool_calls import ParsedTurn, decode_turn, parser_for, parser_named
from llm_stages.rollout.tools import Tool, assistant_message, environment_tools, run_calls, tool_table


@dataclass(frozen=True)
class EpisodeLimits:
    """When an episode stops (`rollout.episode`)."""

    max_turns: int = 4  # policy turns
    max_tool_calls: int = 8  # calls in the whole episode; a turn calling past it ends the episode (truncated)
    max_turn_tokens: int | None = None  # tokens one turn may sample (None: rollout.generation.max_new_tokens)
    max_episode_tokens: int | None = None  # tokens after the prompt, sampled and added (None: no limit but the context)
    tool_timeout: float | None = 10.0  # seconds a tool may run before its turn says it timed out
    max_context: int | None = None  # prompt + episode tokens (None: the model's max_position_embeddings)
    tool_parser: str | None = None  # the tool-call format (None: chosen from the chat template)


@dataclass
class Episode:
    """One episode as it ran: the conversation, its tokens, and what happened (for rewards and metrics)."""

    messages: list[dict]  # the prompt's conversation, then every assistant and tool turn
    environment: Any = None  # the episode's environment instance, or None
    tools: dict[str, Tool] = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # after the prompt: the policy's and the environment's
    sampled: list[int] = field(default_factory=list)  # 1 where the policy sampled the token
    logprobs: list[float] = field(default_factory=list)  # at sampling time (0.0 on the environment's tokens)
    calls: list[dict] = field(default_factory=list)  # every call made: {name, arguments, result, error}
    turns: int = 0
    tool_calls: int = 0  # well-formed calls made
    tool_errors: int = 0  # calls whose tool was unknown, got wrong arguments, raised or timed out
    parse_failures: int = 0  # calls that could not be parsed
    truncated: bool = False  # stopped by a limit, not by a final answer
    overflow: bool = False  # stopped by the token limits (max_context or max_episode_tokens)
    done: bool = False

    @property
    def final_text(self) -> str:
        """The last assistant turn's text (tool-call markup removed): what rewards read as the reply."""
        return next((m.get("content") or "" for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def add(self, tokens: list[int], logprobs: list[float] | None) -> None:
        """Tokens sampled by the policy (with their log-probs) or, with None, added by the environment."""
        self.tokens += tokens
        self.sampled += [int(logprobs is not None)] * len(tokens)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)

    def stop(self, *, truncated: bool = False, overflow: bool = False) -> None:
        self.done, self.truncated, self.overflow = True, truncated or overflow, overflow


def observation_tokens(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The template's tokens for `tool_messages` after a sampled assistant turn: what the template
    renders after a conversation ending in an assistant tool call when the tool turns (and the next
    generation prompt) follow, counted from the end-of-turn token that closes the call (which the
    policy sampled). Tokenized alone, so no token crosses the boundary with the policy's. Templates
    may render the assistant turn itself differently once it is no longer the last (Qwen3 drops its
    empty think block): only the text after its end-of-turn token is taken."""
    call = [{"type": "function", "function": {"name": tool_messages[0].get("name") or "tool", "arguments": {}}}]
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": call}]
    before = render_text(tokenizer, *template_messages(tokenizer, probe, None))
    after = render_text(tokenizer, *template_messages(tokenizer, probe + tool_messages, None), add_generation_prompt=True)
    terminator = turn_end(tokenizer).terminator
    if terminator and terminator in before:
        turns = before.count(terminator)  # the turn ends at this terminator in both renderings
        cut = -len(terminator)
        for _ in range(turns):
            cut = after.find(terminator, cut + len(terminator))
        cut = cut + len(terminator) if cut >= 0 else -1
    else:
        cut = len(before) if after.startswith(before) else -1
    if cut < 0 or not all(str(m["content"]) in after[cut:] for m in tool_messages):
        raise ConfigError("the chat template does not render tool results after the assistant's turn, so they cannot "
                          "be appended to the sampled tokens; use a template that renders tool turns in order")
    return tokenizer(after[cut:], add_special_tokens=False)["input_ids"]


class EpisodeRunner:
    """Runs episodes with a sampler (llm_stages.rollout.sampling.Sampler or the vLLM one: any
    `sample(model, PromptBatch, repeats, generation, seed) -> Sample`) one turn at a time: each turn
    continues every unfinished episode from its ids so far (left-padded), so the sampler needs no
    knowledge of episodes and both backends run them."""

    def __init__(self, sampler, tokenizer, *, tools: list[Tool], environment: Callable | None, limits: EpisodeLimits,
                 context_limit: int):
        self.sampler, self.tokenizer, self.tools, self.environment = sampler, tokenizer, tools, environment
        self.limits, self.context_limit = limits, limits.max_context or context_limit
        self.parser = parser_named(limits.tool_parser) if limits.tool_parser else parser_for(tokenizer)

    # -- episodes ---------------------------------------------------------------------------------
    def start(self, prompts: PromptBatch, repeats: int) -> list[Episode]:
        """One episode per prompt and repeat (consecutive), each with its own environment, reset from the record."""
        if prompts.messages is None or any(m is None for m in prompts.messages):
            raise ConfigError("episodes (rollout.tools / rollout.environment) need prompts read from a data file, "
                              "whose conversations they render with the tools")
        episodes = []
        for messages, fields in zip(prompts.messages, prompts.fields or [None] * len(prompts.messages)):
            for _ in range(repeats):
                episodes.append(self._new_episode(messages, fields or {}))
        return episodes

    def _new_episode(self, messages: list[dict], fields: dict) -> Episode:
        messages = copy.deepcopy(messages)
        environment, tools = None, self.tools
        if self.environment is not None:
            environment = self.environment()
            observation = environment.reset(**fields)
            if observation is not None:  # TRL's protocol: appended to the last user message
                messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}{observation}"}
            tools = [*tools, *environment_tools(environment)]
        tools = tool_table(tools)
        schemas = [t.schema for t in tools.values()] or None
        prompt_ids = render_prompt(self.tokenizer, messages, None, schemas).input_ids
        return Episode(messages, environment, tools, prompt_ids)

    @torch.no_grad()
    def run(self, model, prompts: PromptBatch, *, repeats: int, generation: dict, seed: int) -> tuple[Sample, list[Episode]]:
        episodes = self.start(prompts, repeats)
        turn_tokens = self.limits.max_turn_tokens or generation["max_new_tokens"]
        device = prompts.input_ids.device
        for turn in range(self.limits.max_turns):
            active = [e for e in episodes if not e.done]
            budgets = [self._budget(e, turn_tokens) for e in active]
            for episode, budget in zip(active, budgets):
                if budget <= 0:
                    episode.stop(overflow=True)
            active = [(e, b) for e, b in zip(active, budgets) if b > 0]
            if not active:
                break
            batch = left_padded([e.prompt_ids + e.tokens for e, _ in active], self.tokenizer.pad_token_id, device)
            # The first turn is drawn with the rollout's seed itself: an episode that ends after one
            # turn samples exactly what the single-turn rollout samples.
            turn_seed = seed if turn == 0 else hash((seed, turn)) % (2 ** 31)
            sample = self.sampler.sample(model, batch, repeats=1, seed=turn_seed,
                                         generation={**generation, "max_new_tokens": max(b for _, b in active)})
            for row, (episode, budget) in enumerate(active):
                kept = sample.response_mask[row].bool()
                tokens, logprobs = sample.response[row][kept].tolist()[:budget], sample.sampled_logprobs[row][kept].tolist()[:budget]
                self._take_turn(episode, tokens, logprobs, last_turn=turn == self.limits.max_turns - 1,
                                cut=len(tokens) == budget and budget < turn_tokens)
        return self.as_sample(episodes, prompts.input_ids.device), episodes

    def _budget(self, episode: Episode, turn_tokens: int) -> int:
        room = self.context_limit - len(episode.prompt_ids) - len(episode.tokens)
        if self.limits.max_episode_tokens is not None:
            room = min(room, self.limits.max_episode_tokens - len(episode.tokens))
        return min(turn_tokens, room)

    def _take_turn(self, episode: Episode, tokens: list[int], logprobs: list[float], *, last_turn: bool, cut: bool) -> None:
        """Adds one sampled turn to `episode`, then its tool turn, or ends the episode."""
        episode.add(tokens, logprobs)
        episode.turns += 1
        ended = bool(tokens) and tokens[-1] in self.sampler.eos_ids
        text = decode_turn(self.tokenizer, tokens, self.parser)
        parsed = self.parser.parse(text) if ended else ParsedTurn(text.strip(), [], [])  # a cut turn's call is not run
        episode.messages.append(assistant_message(parsed))
        if not ended:  # the turn ran out of tokens: a token limit (the context's when it cut the turn short)
            return episode.stop(truncated=True, overflow=cut)
        if not parsed.calls and not parsed.failures:
            return episode.stop()  # the final answer
        if last_turn or episode.tool_calls + len(parsed.calls) > self.limits.max_tool_calls:
            return episode.stop(truncated=True)
        results = run_calls(episode.tools, parsed, timeout=self.limits.tool_timeout)
        episode.tool_calls += len(parsed.calls)
        episode.calls += [{"name": c.name, "arguments": c.arguments, "result": r.content, "error": r.error}
                          for c, (_, r) in zip(parsed.calls, results)]
        episode.parse_failures += len(parsed.failures)
        episode.tool_errors += sum(r.error is not None and r.error != "parse" for _, r in results)
        tool_messages = [{"role": "tool", "name": name, "content": result.content} for name, result in results]
        observation = observation_tokens(self.tokenizer, tool_messages)
        if len(episode.prompt_ids) + len(episode.tokens) + len(observation) >= self.context_limit or (
                self.limits.max_episode_tokens is not None
                and len(episode.tokens) + len(observation) >= self.limits.max_episode_tokens):
            return episode.stop(overflow=True)  # no room for the result and a reply to it
        episode.messages.extend(tool_messages)
        episode.add(observation, None)

    # -- the Sample the updates read --------------------------------------------------------------
    def as_sample(self, episodes: list[Episode], device) -> Sample:
        """Prompts left-padded, episodes right-padded; `response_mask` on the policy's tokens,
        `observation_mask` on the environment's."""
        pad = self.tokenizer.pad_token_id
        query = left_padded([e.prompt_ids for e in episodes], pad, device)
        width = max(1, max(len(e.tokens) for e in episodes))
        right = lambda rows, value, dtype: torch.tensor(  # noqa: E731
            [r + [value] * (width - len(r)) for r in rows], dtype=dtype, device=device)
        sampled = right([e.sampled for e in episodes], 0, torch.long)
        real = right([[1] * len(e.tokens) for e in episodes], 0, torch.long)
        return Sample(query.input_ids, query.attention_mask, right([e.tokens for e in episodes], pad, torch.long),
                      sampled, right([e.logprobs for e in episodes], 0.0, torch.float32), real - sampled)


def left_padded(rows: list[list[int]], pad_token_id: int, device) -> PromptBatch:
    """Token rows as a left-padded PromptBatch (generation continues every row at the same position)."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return PromptBatch(input_ids, mask, [""] * len(rows), [None] * len(rows))


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Per-rollout means logged as env/*: turns, tool calls, tool errors, parse failures, truncation."""
    n = max(1, len(episodes))
    return {"turns_mean": sum(e.turns for e in episodes) / n,
            "tool_calls_mean": sum(e.tool_calls for e in episodes) / n,
            "tool_errors": float(sum(e.tool_errors for e in episodes)),
            "parse_failures": float(sum(e.parse_failures for e in episodes)),
            "truncated_fraction": sum(e.truncated for e in episodes) / n}
