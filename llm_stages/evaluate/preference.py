"""Preference tasks: on pairs, how often the model prefers the chosen reply.

- a reward model (an RM export: scalar head) scores both sequences as RM training reads them;
- a policy scores them by DPO's implicit reward, beta * (log p_policy - log p_reference) summed over
  the reply tokens (`DPO.score`), against `eval.reference_model` (null: reference-free, beta * log p).
A tie counts half (a model equal to its reference shows 0.5). Calibration (ECE of sigmoid(r_c - r_r))
and length bias are the RM stage's `reward_report`; with a `subset` / `category` column (RewardBench)
each subset's accuracy is reported too."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from llm_stages.data.datamodule import PairDataModule
from llm_stages.data.kinds.pair import collate_pairs
from llm_stages.evaluate.task import EvalContext, TaskResult, batches, progress, read_task, task_data
from llm_stages.stages.dpo import DPO
from llm_stages.models import reward_scores
from llm_stages.stages.reward import reward_report

SUBSET_KEYS = ("subset", "category")


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when chosen scores higher, 0.5 on a tie, 0 otherwise."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


@torch.no_grad()
def pair_rewards(ctx: EvalContext, batch, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of a collated PairBatch under the model being evaluated."""
    n = batch.num_pairs
    if ctx.head == "reward":
        scores = reward_scores(ctx.model, batch.input_ids, batch.attention_mask)
    else:
        scores = DPO.score(ctx.model, batch)[0]
        if ctx.reference is not None:
            scores = scores - DPO.score(ctx.reference, batch)[0]
        scores = beta * scores
    return scores[:n].float(), scores[n:].float()


def run(ctx: EvalContext, name: str, task: DictConfig) -> TaskResult:
    data = task_data(name, task)
    datamodule = PairDataModule(data, ctx.tokenizer, max_length=task.get("max_length", 1024),
                                max_prompt_length=task.get("max_prompt_length", 512), batch_size=1)
    read = read_task(datamodule, data)  # a file without pairs: one line from the pair reader
    beta = float(task.get("beta", 0.1))
    rows = []
    for group in progress(list(batches([e for _, e in read], ctx.batch_size)), ctx, name):
        batch = collate_pairs(group, ctx.tokenizer.pad_token_id)
        batch = batch._replace(**{k: getattr(batch, k).to(ctx.device) for k in ("input_ids", "attention_mask", "labels")})
        chosen, rejected = pair_rewards(ctx, batch, beta)
        lengths = (batch.labels != -100).sum(-1).float()
        rows.append(torch.stack([chosen, rejected, lengths[:batch.num_pairs], lengths[batch.num_pairs:]], 1).cpu())
    rows = torch.cat(rows)
    chosen, rejected = rows[:, 0], rows[:, 1]
    accuracy = pair_accuracy(chosen, rejected)
    metrics = {"accuracy": accuracy.mean().item(), "margin": (chosen - rejected).mean().item(),
               **reward_report(*rows.unbind(1), bins=int(task.get("calibration_bins", 10)))}
    subsets = [next((str(r.data[k]) for k in SUBSET_KEYS if k in r.data), None) for r, _ in read]
    for subset in sorted({s for s in subsets if s is not None}):
        mask = torch.tensor([s == subset for s in subsets])
        metrics[f"{subset}/accuracy"] = accuracy[mask].mean().item()
    scorer = "reward_model" if ctx.head == "reward" else ("implicit_reward" if ctx.reference is not None else "logp")
    return TaskResult(name, "preference", {"accuracy": metrics.pop("accuracy"), **metrics}, len(read),
                      details={"scored_by": scorer})
