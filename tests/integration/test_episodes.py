"""Multi-turn episodes: masks exact, tokens exactly as sampled, failures as tool turns, TRL-style
environments, single-turn equivalence, metrics, and exact resume with episodes."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.data.kinds.prompt import PromptBatch, render_prompt
from llm_stages.models import load_tokenizer
from llm_stages.rollout.episodes import EpisodeLimits, EpisodeRunner, left_padded, observation_tokens
from llm_stages.rollout.rollout import Trajectory
from llm_stages.rollout.sampling import Sample
from llm_stages.rollout.tool_calls import ParsedTurn, ToolCall
from llm_stages.rollout.tools import tool_from_callable
from llm_stages.train import build, train
from tests.integration.test_rl_stages import GRPO, PPO, Recorder, _fit

TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"


def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def fail(reason: str) -> str:
    """Always raises.

    Args:
        reason: What the error says.
    """
    raise RuntimeError(reason)


def slow(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke"


class ScriptedSampler:
    """Returns scripted turns (token lists), one per call per row, recording the contexts it was given."""

    def __init__(self, tokenizer, turns: list[list[list[int]]]):
        self.tokenizer, self.turns, self.contexts, self.calls = tokenizer, turns, [], 0
        self.eos_ids = [tokenizer.eos_token_id]

    def sample(self, model, prompts: PromptBatch, *, repeats, generation, seed):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompts.input_ids, prompts.attention_mask)]
        self.contexts.append(rows)
        replies = self.turns[self.calls][:len(rows)]
        self.turns[self.calls] = self.turns[self.calls][len(rows):]
        self.calls += 1
        width = max(len(r) for r in replies)
        response = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in replies])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
        logprobs = -torch.arange(1, width + 1).float().expand(len(rows), width) / 100 * mask
        return Sample(prompts.input_ids, prompts.attention_mask, response, mask, logprobs, torch.zeros_like(mask))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(OmegaConf.create({"name": "tiny"}))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _call(expression_a: int, expression_b: int, name: str = "multiply") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"a": {expression_a}, "b": {expression_b}}}}}\n</tool_call>'


def _prompts(tokenizer, questions: list[str], fields: list[dict] | None = None) -> PromptBatch:
    messages = [[{"role": "user", "content": q}] for q in questions]
    ids = [render_prompt(tokenizer, m, None).input_ids for m in messages]
    batch = left_padded(ids, tokenizer.pad_token_id, "cpu")
    return batch._replace(prompts=questions, answers=[None] * len(questions), messages=messages,
                          fields=fields or [{} for _ in questions])


def _runner(tokenizer, turns, *, tools=(multiply,), environment=None, **limits):
    sampler = ScriptedSampler(tokenizer, turns)
    runner = EpisodeRunner(sampler, tokenizer, tools=[tool_from_callable(t) for t in tools], environment=environment,
                           limits=EpisodeLimits(**limits), context_limit=2048)
    return runner, sampler


def test_three_turn_episode_masks_cover_exactly_the_policy_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [_ids(tok, _call(6, 7)), _ids(tok, "Let me check. " + _call(42, 2)), _ids(tok, "The answer is 84.")]
    runner, sampler = _runner(tok, [[turns[0]], [turns[1]], [turns[2]]])
    sample, [episode] = runner.run(None, _prompts(tok, ["What is 6*7*2?"]), repeats=1,
                                   generation={"max_new_tokens": 256}, seed=0)
    first = observation_tokens(tok, [{"role": "tool", "name": "multiply", "content": "42"}])
    second = observation_tokens(tok, [{"role": "tool", "name": "multiply", "content": "84"}])
    assert tok.decode(first) == "\n<|im_start|>user\n42<|im_end|>\n<|im_start|>assistant\n"
    expected = turns[0] + first + turns[1] + second + turns[2]
    assert sample.response[0].tolist() == expected  # the sampled ids, never re-tokenized
    policy = [1] * len(turns[0]) + [0] * len(first) + [1] * len(turns[1]) + [0] * len(second) + [1] * len(turns[2])
    assert sample.response_mask[0].tolist() == policy
    assert sample.observation_mask[0].tolist() == [1 - p for p in policy]
    # The log-probs are the sampler's, at the sampled tokens; 0 on the environment's.
    lp = sample.sampled_logprobs[0]
    assert lp[:len(turns[0])].tolist() == pytest.approx([-(i + 1) / 100 for i in range(len(turns[0]))])
    assert (lp[sample.observation_mask[0].bool()] == 0).all()
    # Each turn continued from the ids so far: the prompt, then exactly the tokens above.
    prompt = sample.query[0][sample.query_mask[0].bool()].tolist()
    assert sampler.contexts[1] == [prompt + turns[0] + first]
    assert sampler.contexts[2] == [prompt + turns[0] + first + turns[1] + second]
    assert (episode.turns, episode.tool_calls, episode.tool_errors, episode.parse_failures, episode.truncated) == (3, 2, 0, 0, False)
    assert episode.final_text == "The answer is 84."
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [c["result"] for c in episode.calls] == ["42", "84"]


def test_sampled_tokens_are_kept_where_re_tokenizing_would_differ(tiny_tokenizer):
    """A turn sampled as single characters: decoding and encoding it again would merge them."""
    tok = tiny_tokenizer
    text = "The answer is 84."
    chars = [tok.convert_tokens_to_ids(c) for c in text.replace(" ", "Ġ")]
    assert tok(text, add_special_tokens=False)["input_ids"] != chars  # re-tokenizing would differ
    runner, _ = _runner(tok, [[chars + [tok.eos_token_id]]])
    sample, [episode] = runner.run(None, _prompts(tok, ["?"]), repeats=1, generation={"max_new_tokens": 256}, seed=0)
    assert sample.response[0].tolist() == chars + [tok.eos_token_id] and episode.final_text == text


@pytest.mark.parametrize("template,expected", [
    ("qwen2_5.jinja", "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
    ("qwen3.jinja", "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
    ("llama3_2.jinja", "<|start_header_id|>ipython<|end_header_id|>\n\n\"42\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_observation_tokens_are_the_templates_tool_turn(tiny_tokenizer, template, expected):
    tok = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    tok.chat_template = (TEMPLATES / template).read_text()
    if "eot_id" in expected:
        tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]})
    delta = tok.decode(observation_tokens(tok, [{"role": "tool", "name": "multiply", "content": "42"}]))
    assert delta == expected


def test_failures_become_tool_turns_and_counts(tiny_tokenizer):
    tok = tiny_tokenizer
    bad_json = '<tool_call>\n{"name": "multiply", "arguments": {"a": 6,\n</tool_call>'
    unknown = _call(1, 2, name="divide")
    wrong = '<tool_call>\n{"name": "multiply", "arguments": {"x": 1}}\n</tool_call>'
    raises = '<tool_call>\n{"name": "fail", "arguments": {"reason": "disk on fire"}}\n</tool_call>'
    timeout = '<tool_call>\n{"name": "slow", "arguments": {"seconds": 1.0}}\n</tool_call>'
    turns = [[_ids(tok, t)] for t in (bad_json, unknown, wrong, raises, timeout)] + [[_ids(tok, "done")]]
    runner, _ = _runner(tok, turns, tools=(multiply, fail, slow), max_turns=6, tool_timeout=0.2)
    _, [episode] = runner.run(None, _prompts(tok, ["go"]), repeats=1, generation={"max_new_tokens": 256}, seed=0)
    results = [m["content"] for m in episode.messages if m["role"] == "tool"]
    assert len(results) == 5 and episode.final_text == "done" and not episode.truncated
    assert "not valid JSON" in results[0]
    assert "divide" in results[1] and "multiply" in results[1]
    assert "disk on fire" in results[3] and "RuntimeError" in results[3]
    assert "0.2" in results[4]
    assert [c["error"] for c in episode.calls] == ["unknown_tool", "bad_arguments", "raised", "timeout"]
    assert (episode.parse_failures, episode.tool_errors, episode.tool_calls) == (1, 4, 4)


def test_limits_end_episodes_truncated(tiny_tokenizer):
    tok = tiny_tokenizer
    call = _ids(tok, _call(2, 3))
    runner, _ = _runner(tok, [[call], [call]], max_turns=2)
    _, [episode] = runner.run(None, _prompts(tok, ["?"]), repeats=1, generation={"max_new_tokens": 256}, seed=0)
    assert episode.turns == 2 and episode.tool_calls == 1 and episode.truncated and not episode.overflow
    runner, _ = _runner(tok, [[call[:-1] + call]], max_tool_calls=1)  # two calls in one turn, one allowed
    _, [episode] = runner.run(None, _prompts(tok, ["?"]), repeats=1, generation={"max_new_tokens": 256}, seed=0)
    assert episode.tool_calls == 0 and episode.truncated
    # A token limit: the result would not fit, so the episode stops before it, as an overflow.
    runner, _ = _runner(tok, [[call]], max_episode_tokens=len(call) + 3)
    sample, [episode] = runner.run(None, _prompts(tok, ["?"]), repeats=1, generation={"max_new_tokens": 256}, seed=0)
    assert episode.overflow and episode.truncated and sample.response_mask.sum() == len(call)
    assert sample.observation_mask.sum() == 0


class CounterEnv:
    """A TRL-style environment (environment_factory protocol), written here, not imported from TRL."""

    def reset(self, **row) -> str | None:
        self.target, self.total = int(row["target"]), 0
        return f" (reach {self.target})"

    def add(self, amount: int) -> str:
        """Adds to the counter.

        Args:
            amount: How much to add.
        """
        self.total += amount
        return str(self.total)

    def get_reward(self) -> float:
        return float(self.total == self.target)

    def _private(self):
        raise AssertionError("not a tool")


def test_trl_style_environment_runs_unchanged(tiny_tokenizer):
    tok = tiny_tokenizer
    add = lambda n: _ids(tok, f'<tool_call>\n{{"name": "add", "arguments": {{"amount": {n}}}}}\n</tool_call>')  # noqa: E731
    turns = [[add(5), add(1)], [add(2), _ids(tok, "stop")], [_ids(tok, "ok")]]
    runner, sampler = _runner(tok, turns, tools=(), environment=CounterEnv)
    sample, episodes = runner.run(None, _prompts(tok, ["count", "count"], [{"target": 7}, {"target": 3}]),
                                  repeats=1, generation={"max_new_tokens": 256}, seed=0)
    assert [e.environment.total for e in episodes] == [7, 1]
    assert [e.environment.get_reward() for e in episodes] == [1.0, 0.0]
    assert episodes[0].messages[0]["content"] == "count (reach 7)"  # reset's observation, appended
    prompt = tok.decode(sample.query[0][sample.query_mask[0].bool()])
    assert '"name": "add"' in prompt and "_private" not in prompt and "get_reward" not in prompt
    assert [e.turns for e in episodes] == [3, 2]


# -- through the stages: the tiny model, a parser that reads every turn as a call -------------------
class EveryTurnCalls:
    """Reads each turn as a call of `multiply` (a random tiny model never writes the markup itself)."""

    name, markers = "every_turn", ()

    def parse(self, text: str) -> ParsedTurn:
        return ParsedTurn(text.strip(), [ToolCall("multiply", {"a": len(text), "b": 2})], [])


DIGIT = ("+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, "
         "_partial_: true, pattern: '.*[0-9].*'}}")
TOOLS = "rollout.tools=[{_target_: tests.integration.test_episodes.multiply, _partial_: true}]"
EPISODES = [TOOLS, "rollout.episode.max_turns=3", "rollout.episode.max_turn_tokens=6"]


def ending_quarter(model, tokenizer) -> list[int]:
    """A quarter of the vocabulary ends a turn: the random tiny model's turns end within a few tokens."""
    return sorted({tokenizer.eos_token_id, *range(3, len(tokenizer), 4)})


@pytest.fixture
def every_turn_calls(monkeypatch):
    """Turns that end and are each read as a call."""
    monkeypatch.setattr("llm_stages.rollout.episodes.parser_for", lambda tokenizer: EveryTurnCalls())
    monkeypatch.setattr("llm_stages.rollout.sampling.eos_ids", ending_quarter)


@pytest.mark.slow
def test_grpo_over_episodes_logs_env_metrics_and_trains(make_cfg, tmp_path, every_turn_calls):
    train(make_cfg(*GRPO, *EPISODES, "trainer.max_steps=4", "trainer.limit_val_batches=1", "logger=csv",
                            "trainer.val_check_interval=1", output_dir=tmp_path))
    [metrics_csv] = Path(tmp_path).glob("csv/**/metrics.csv")
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in ("env/turns_mean", "env/tool_calls_mean", "env/tool_errors", "env/parse_failures",
                 "env/truncated_fraction", "env/reward_mean", "val/reward", "val/turns_mean"):
        assert name in columns, name
    turns = [float(r["env/turns_mean"]) for r in rows if r.get("env/turns_mean")]
    # The update's log-probs of the sampled tokens equal the sampling-time ones, tool turns in between.
    diffs = [float(r["rollout/logprob_diff_max"]) for r in rows if r.get("rollout/logprob_diff_max")]
    assert diffs and max(diffs) < 1e-4, diffs
    assert turns and all(1 < t <= 3 for t in turns)


def test_one_turn_episodes_equal_the_single_turn_rollout(make_cfg):
    """An environment that answers after one turn (no tools, no observation): the same sample, the
    same loss and gradients as the single-turn GRPO on it."""
    single, datamodule = build(make_cfg(*GRPO))
    episodic, _ = build(make_cfg(*GRPO, "rollout.environment={_target_: tests.integration.test_episodes.Silent, _partial_: true}"))
    episodic.model.load_state_dict(single.model.state_dict())
    datamodule.setup("fit")
    [prompts] = next(iter(datamodule.train_dataloader()))
    a = single.rollout(single.model, prompts, repeats=4, seed=11)
    b = episodic.rollout(episodic.model, prompts, repeats=4, seed=11)
    for field in Sample._fields:
        assert torch.equal(getattr(a.sample, field), getattr(b.sample, field)), field
    assert b.episodes is not None and all(e.turns == 1 for e in b.episodes)
    grads = []
    for module, replies in ((single, a), (episodic, b)):
        zeros = torch.zeros(replies.sample.response.shape)
        advantages = torch.linspace(-1, 1, zeros.numel()).view_as(zeros)
        trajectory = Trajectory.from_sample(replies.sample, logprobs=zeros, ref_logprobs=zeros, advantages=advantages,
                                            scores=zeros[:, 0])
        module.model.zero_grad()
        loss, _ = module.grpo_loss(trajectory, single_pass=True)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in module.model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(x, y) for x, y in zip(grads[0][1], grads[1][1]))


class Silent:
    """An environment with no tools: every episode is one turn."""

    def reset(self, **row):
        return None


@pytest.mark.slow
def test_ppo_over_episodes_resumes_exactly(make_cfg, tmp_path, every_turn_calls):
    cfg = make_cfg(*PPO, *EPISODES, "trainer.max_steps=12")  # 3 iterations
    uninterrupted = Recorder()
    _fit(*build(cfg), cfg, [uninterrupted])
    assert uninterrupted.rows[0]["env/turns_mean"] > 1  # multi-turn episodes, with tool turns in the sequence
    stopped = Recorder(stop_after=2, path=tmp_path / "k2.ckpt")
    _fit(*build(cfg), cfg, [stopped])
    assert stopped.rows == uninterrupted.rows[:2]
    resumed = Recorder()
    module, datamodule = build(cfg)
    _fit(module, datamodule, cfg, [resumed], ckpt_path=tmp_path / "k2.ckpt")
    for key, value in uninterrupted.rows[2].items():
        assert resumed.rows[0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_grpo_over_episodes_with_lora_and_a_kl_reference(make_cfg, tmp_path, every_turn_calls):
    """LoRA: the reference is the policy with its adapter off, over the same episode tokens."""
    rows = Recorder(prefixes=("grpo/", "env/"))
    cfg = make_cfg(*GRPO, *EPISODES, DIGIT, "peft=lora", "module.beta=0.04", "optim.lr=1e-2", "trainer.max_steps=8")
    module, datamodule = build(cfg)
    _fit(module, datamodule, cfg, [rows])
    assert len(rows.rows) == 2 and all(r["env/turns_mean"] > 1 for r in rows.rows)
    assert 0 < rows.rows[1]["grpo/kl"] < 1  # the adapter moved the policy off the reference


@pytest.mark.slow
def test_grpo_estimators_dynamic_sampling_and_overlong_run_per_episode(make_cfg, every_turn_calls):
    rows = Recorder(prefixes=("grpo/", "env/", "rollout/"))
    cfg = make_cfg(*GRPO, *EPISODES, DIGIT, "module.advantage=rloo", "module.dynamic_sampling=true",
                   "module.max_extra_rounds=1", "rollout.overlong_buffer=2", "trainer.max_steps=4")
    _fit(*build(cfg), cfg, [rows])
    [row] = rows.rows
    assert row["env/turns_mean"] > 1 and -1 <= row["env/reward/overlong"] <= 0
    assert row["rollout/kept_groups"] + row["rollout/dropped_groups"] >= 1
