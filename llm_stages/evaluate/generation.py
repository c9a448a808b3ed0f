"""Generation tasks: replies to prompts (the RL stages' prompt kind), greedy or sampled, batched
with left padding and the KV cache, seeded; scored by the verified-answer reward
(`rewards.answer_match`), pass@k from k samples per prompt, mean reply length, and the mean score
of a reward model when one is given. `sample_replies` is also what `python -m llm_stages generate`
writes, so both give the same completions for the same seed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from llm_stages.data.datamodule import PromptDataModule
from llm_stages.data.kinds.prompt import PromptBatch, PromptExample, collate_prompts
from llm_stages.data.sources import Record
from llm_stages.errors import ConfigError, DataFormatError
from llm_stages.evaluate.task import EvalContext, TaskResult, batches, progress, read_task, task_data
from llm_stages.rollout.rewards import answer_match
from llm_stages.rollout.rollout import Scorer
from llm_stages.rollout.sampling import Sample, Sampler
from llm_stages.training.run_dir import write_text_atomic
from llm_stages.rollout.sampling import eos_ids

# Greedy unless the task says otherwise; the keys are rollout.generation's.
DEFAULT_GENERATION = {"max_new_tokens": 256, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
ID_KEYS = ("id", "idx", "index", "uid", "qid", "question_id", "task_id")


class Chunk(NamedTuple):
    """One batch of prompts and the replies sampled to it (`num_samples` consecutive rows per prompt)."""

    first: int  # index of its first prompt in the task's list
    prompts: PromptBatch
    sample: Sample
    completions: list[str]  # decoded replies, special tokens removed


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021,
    the Codex paper): 1 - C(n-c, k) / C(n, k), as the paper computes it, a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def generation_settings(generation) -> dict:
    settings = {**DEFAULT_GENERATION, **(OmegaConf.to_container(generation) if OmegaConf.is_config(generation)
                                         else dict(generation or {}))}
    settings.pop("batch_size", None)
    return settings


@torch.no_grad()
def sample_replies(ctx: EvalContext, examples: list[PromptExample], generation, *, num_samples: int = 1,
                   desc: str = "generate") -> list[Chunk]:
    """`num_samples` replies to each prompt, `ctx.batch_size` prompts per generate() call (left-padded
    to the batch's longest), the batch at index i seeded with ctx.seed + i."""
    sampler = Sampler(ctx.model, ctx.tokenizer, generation_settings(generation))
    chunks = []
    for i, group in enumerate(progress(list(batches(examples, ctx.batch_size)), ctx, desc)):
        prompts = collate_prompts(group, ctx.tokenizer.pad_token_id)
        prompts = prompts._replace(input_ids=prompts.input_ids.to(ctx.device),
                                   attention_mask=prompts.attention_mask.to(ctx.device))
        sample = sampler.sample(ctx.model, prompts, repeats=num_samples, generation=sampler.generation, seed=ctx.seed + i)
        completions = ctx.tokenizer.batch_decode(sample.response, skip_special_tokens=True)
        chunks.append(Chunk(i * ctx.batch_size, prompts, sample, completions))
    return chunks


def id_fields(record: Record) -> dict:
    return {k: v for k, v in record.data.items() if k in ID_KEYS or k.endswith("_id")}


def completion_rows(records: list[Record], chunks: list[Chunk], num_samples: int) -> list[dict]:
    """One row per reply: the prompt (its last user message), the completion, the record's id fields."""
    rows = []
    for chunk in chunks:
        for j, completion in enumerate(chunk.completions):
            index = chunk.first + j // num_samples
            rows.append({"prompt": chunk.prompts.prompts[j // num_samples], "completion": completion,
                         **({"sample": j % num_samples} if num_samples > 1 else {}), **id_fields(records[index])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Whole or not at all (a temporary sibling renamed into place), as results.json and the checkpoints."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def read_prompts(ctx: EvalContext, data: DictConfig, max_prompt_length: int) -> list[tuple[Record, PromptExample]]:
    datamodule = PromptDataModule(data, ctx.tokenizer, max_prompt_length=max_prompt_length, batch_size=1)
    return read_task(datamodule, data)


def score_replies(ctx: EvalContext, chunks: list[Chunk], n: int, *, accuracy: bool) -> dict[str, list[float]]:
    """Each reply's scores by name, through the RL stages' Scorer: "correct" (`answer_match`) and
    "reward_model" (the mean score of `ctx.reward_model`), as far as asked for."""
    rewards = {"correct": {"fn": answer_match, "weight": 1.0}} if accuracy else None
    if not rewards and not ctx.reward_model:
        return {}
    scorer = Scorer(ctx.tokenizer, eos_ids(ctx.model, ctx.tokenizer), rewards=rewards, reward_model=ctx.reward_model,
                    missing_eos_penalty=None).to(ctx.device)
    components: dict[str, list[float]] = {}
    for chunk in chunks:
        answers = [a for a in chunk.prompts.answers for _ in range(n)]
        prompts = [p for p in chunk.prompts.prompts for _ in range(n)]
        for key, values in scorer.score(prompts, answers, chunk.sample).components.items():
            components.setdefault(key, []).extend(values.tolist())
    return components


def run(ctx: EvalContext, name: str, task: DictConfig) -> TaskResult:
    if ctx.head != "causal_lm":
        return TaskResult(name, "generation", {}, 0, skipped="a reward model does not generate")
    data = task_data(name, task)
    read = read_prompts(ctx, data, task.get("max_prompt_length", 1024))
    records, examples = [r for r, _ in read], [e for _, e in read]
    if task.get("accuracy", True):
        for record, example in read:
            if example.answer is None:
                raise DataFormatError(record.path, f"eval task {name!r} scores answers, but this prompt has none; give "
                                      "each record an answer (data.columns={answer: <your field>}) or set "
                                      f"eval.tasks.{name}.accuracy=false", line=record.line, field="answer")
    n = int(task.get("num_samples", 1))
    ks = [int(k) for k in task.get("pass_k", [1])]
    if any(k < 1 or k > n for k in ks):
        raise ConfigError(f"eval.tasks.{name}.pass_k={ks}: each k must be in 1..num_samples={n}")
    chunks = sample_replies(ctx, examples, task.get("generation"), num_samples=n, desc=name)

    components = score_replies(ctx, chunks, n, accuracy=task.get("accuracy", True))
    lengths = torch.cat([c.sample.response_mask.sum(1).float().cpu() for c in chunks])

    metrics: dict[str, float] = {}
    if "correct" in components:
        correct = torch.tensor(components["correct"]).view(-1, n)
        metrics["accuracy"] = correct.mean().item()
        for k in ks:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, int(c), k) for c in correct.sum(1).tolist()) / len(correct)
    if "reward_model" in components:
        metrics["reward_model_score"] = float(torch.tensor(components["reward_model"]).mean())
    metrics["mean_reply_tokens"] = lengths.mean().item()
    rows = completion_rows(records, chunks, n)
    for i, row in enumerate(rows):
        if "correct" in components:
            row["answer"], row["correct"] = examples[i // n].answer, components["correct"][i]
        if "reward_model" in components:
            row["reward_model_score"] = components["reward_model"][i]
    path = write_jsonl(ctx.output_dir / f"{name}_completions.jsonl", rows)
    return TaskResult(name, "generation", metrics, len(examples), details={"completions": str(path)})
