"""Likelihood tasks, scored by the model's log-probabilities without generating:

- `kind: conversation` (default): held-out loss and perplexity of SFT data over the reply tokens only
  (the masks the chat template gives, as SFT trains);
- `kind: text`: of plain text cut into `block_size` blocks as PT reads it;
- `kind: multiple_choice`: `{question, choices, answer}` records, the option with the highest
  log-likelihood is the model's answer. `acc` sums the option's token log-probs, `acc_norm` divides
  them by the option's length in characters (lm-eval's acc / acc_norm); `score: acc | acc_norm` says
  which is the task's `accuracy`, both are reported."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from llm_stages.data import sources
from llm_stages.data.collate import collate_causal
from llm_stages.data.datamodule import PTDataModule, SFTDataModule
from llm_stages.data.kinds.choice import option_text, read_choice, render_choice
from llm_stages.errors import ConfigError, DataFormatError
from llm_stages.evaluate.task import EvalContext, TaskResult, batches, progress, read_task, task_data
from llm_stages.losses.causal import labelled_outputs, sequence_logps

KINDS = ("conversation", "text", "multiple_choice")


@torch.no_grad()
def example_logps(ctx: EvalContext, examples: list, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each example's labelled tokens and their count, (N,) each."""
    logps, counts = [], []
    for group in progress(list(batches(examples, ctx.batch_size)), ctx, desc):
        batch = collate_causal(group, ctx.tokenizer.pad_token_id)
        outputs, labels = labelled_outputs(ctx.model, batch.labels.to(ctx.device), input_ids=batch.input_ids.to(ctx.device),
                                          attention_mask=batch.attention_mask.to(ctx.device))
        summed, n_tokens, _ = sequence_logps(outputs, labels)
        logps.append(summed.cpu())
        counts.append(n_tokens.cpu())
    return torch.cat(logps), torch.cat(counts)


def perplexity(ctx: EvalContext, name: str, task: DictConfig, kind: str) -> TaskResult:
    data = task_data(name, task)
    if kind == "text":
        datamodule = PTDataModule(data, ctx.tokenizer, block_size=task.get("block_size", 1024), remainder="pad",
                                  batch_size=1)
        examples = datamodule.build_examples(Path(str(data.path)), "eval")
    else:
        datamodule = SFTDataModule(data, ctx.tokenizer, max_length=task.get("max_length", 1024), batch_size=1)
        examples = [e for _, e in read_task(datamodule, data)]
    logps, counts = example_logps(ctx, examples, name)
    loss = (-logps.sum() / counts.sum()).item()
    return TaskResult(name, "likelihood", {"loss": loss, "perplexity": math.exp(loss), "tokens": float(counts.sum())},
                      len(examples))


def multiple_choice(ctx: EvalContext, name: str, task: DictConfig) -> TaskResult:
    data = task_data(name, task)
    score = task.get("score", "acc")
    if score not in ("acc", "acc_norm"):
        raise ConfigError(f"eval.tasks.{name}.score={score}: expected acc (summed log-likelihood) or acc_norm "
                          "(per character of the option)")
    show = bool(task.get("show_choices", False))
    columns = dict(data.columns) if data.get("columns") else None
    questions = [read_choice(r, columns=columns) for r in sources.read_configured(Path(str(data.path)), data)]
    if not questions:
        raise DataFormatError(data.path, "no multiple-choice records")
    rows = [render_choice(ctx.tokenizer, q, show_choices=show) for q in questions]
    logps, _ = example_logps(ctx, [e for options in rows for e in options], name)
    correct = {"acc": [], "acc_norm": []}
    start = 0
    for q in questions:
        option_logps = logps[start:start + len(q.choices)]
        start += len(q.choices)
        chars = torch.tensor([len(option_text(q, i, show)) for i in range(len(q.choices))], dtype=torch.float32)
        correct["acc"].append(float(int(option_logps.argmax()) == q.answer))
        correct["acc_norm"].append(float(int((option_logps / chars.clamp(min=1)).argmax()) == q.answer))
    acc, acc_norm = (sum(v) / len(v) for v in correct.values())
    return TaskResult(name, "likelihood", {"accuracy": acc if score == "acc" else acc_norm, "acc": acc,
                                           "acc_norm": acc_norm}, len(questions), details={"accuracy_is": score})


def run(ctx: EvalContext, name: str, task: DictConfig) -> TaskResult:
    if ctx.head != "causal_lm":
        return TaskResult(name, "likelihood", {}, 0, skipped="a reward model has no language-model head")
    kind = task.get("kind", "conversation")
    if kind not in KINDS:
        raise ConfigError(f"eval.tasks.{name}.kind={kind}: expected one of {', '.join(KINDS)}")
    return multiple_choice(ctx, name, task) if kind == "multiple_choice" else perplexity(ctx, name, task, kind)
