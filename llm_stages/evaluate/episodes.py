"""Episode tasks: an agent's success rate on held-out prompts. Each prompt is answered by a whole
episode (llm_stages.rollout.episodes) with the task's tools and/or environment, greedy unless the
task says otherwise, and scored by the task's rewards (and an environment's own `get_reward`)
exactly as the RL stages score it; an episode succeeds when its score reaches `success_threshold`.

    tasks:
      calculator:
        type: episodes
        data: {path: prompts.jsonl}
        tools: [{_target_: llm_stages.rollout.builtin_tools.calculator, _partial_: true}]
        environment: null
        rewards: {correct: {weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.answer_match, _partial_: true}}}
        episode: {max_turns: 3}
        generation: {max_new_tokens: 48, do_sample: false}
        success_threshold: 1.0
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llm_stages.data.kinds.prompt import collate_prompts
from llm_stages.errors import ConfigError
from llm_stages.evaluate.generation import generation_settings, read_prompts, write_jsonl
from llm_stages.evaluate.task import EvalContext, TaskResult, batches, progress, task_data
from llm_stages.rollout.episodes import episode_metrics
from llm_stages.rollout.rollout import Rollout


def build_rollout(ctx: EvalContext, name: str, task: DictConfig) -> Rollout:
    """The task's rollout: its tools, environment, rewards and episode limits, with the model under evaluation."""
    if not task.get("tools") and not task.get("environment"):
        raise ConfigError(f"eval.tasks.{name} (type: episodes) needs tools and/or an environment: "
                          f"eval.tasks.{name}.tools=[{{_target_: ..., _partial_: true}}] or "
                          f"eval.tasks.{name}.environment={{_target_: ..., _partial_: true}}")
    built = {key: instantiate(task.get(key)) if task.get(key) is not None else None
             for key in ("tools", "environment", "rewards")}
    episode = OmegaConf.to_container(task.get("episode"), resolve=True) if task.get("episode") else None
    return Rollout(ctx.model, ctx.tokenizer, generation=generation_settings(task.get("generation")),
                   rewards=built["rewards"], tools=list(built["tools"] or []), environment=built["environment"],
                   episode=episode, context_overflow_reward=task.get("context_overflow_reward", 0.0)).to(ctx.device)


@torch.no_grad()
def run(ctx: EvalContext, name: str, task: DictConfig) -> TaskResult:
    if ctx.head != "causal_lm":
        return TaskResult(name, "episodes", {}, 0, skipped="a reward model does not generate")
    rollout = build_rollout(ctx, name, task)
    read = read_prompts(ctx, task_data(name, task), task.get("max_prompt_length", 1024))
    threshold = float(task.get("success_threshold", 1.0))
    rows, scores, episodes = [], [], []
    for i, group in enumerate(progress(list(batches([e for _, e in read], ctx.batch_size)), ctx, name)):
        prompts = collate_prompts(group, ctx.tokenizer.pad_token_id)
        prompts = prompts._replace(input_ids=prompts.input_ids.to(ctx.device),
                                   attention_mask=prompts.attention_mask.to(ctx.device))
        replies = rollout(ctx.model, prompts, seed=ctx.seed + i)
        scores += replies.scores.total.tolist()
        episodes += replies.episodes
        for j, episode in enumerate(replies.episodes):
            rows.append({"prompt": prompts.prompts[j], "answer": prompts.answers[j], "score": scores[len(rows)],
                         "success": scores[len(rows)] >= threshold, "turns": episode.turns,
                         "truncated": episode.truncated, "messages": episode.messages})
    rollout.close()
    total = torch.tensor(scores)
    metrics = {"success_rate": (total >= threshold).float().mean().item(), "reward_mean": total.mean().item(),
               **episode_metrics(episodes)}
    path = write_jsonl(ctx.output_dir / f"{name}_episodes.jsonl", rows)
    return TaskResult(name, "episodes", metrics, len(read), details={"episodes": str(path)})
