"""TRL 1.16's side of a comparison, run in a child process: its trainer for the workload, on the shared
checkpoint and our token ids, with a step clock.

Imports neither Lightning nor llm_stages' training code (only the rule reward, a plain function), so
the peak RSS is TRL's own. What is overridden in TRL's trainers, and why:
- `_get_train_sampler` -> in order (unpacked SFT, RM, DPO): rows were written in our sampler's
  order, so both sides see the same batches. GRPO keeps its RepeatSampler with shuffle_dataset=False.
- `_prepare_dataset` (DPO only; SFT and RM already skip tokenized columns): returns our
  pre-tokenized prompt/chosen/rejected ids as they are.
- `training_step` / `_generate_and_score_completions`: count tokens and samples, then call TRL's.
"""

from __future__ import annotations

import json
import time

import torch
from transformers import TrainerCallback

from bench.clock import StepClock


def answer_match(prompts, completions, answer, **_):
    """llm_stages.rollout.rewards.answer_match, called the way TRL calls reward functions (conversational
    completions arrive as message lists; the dataset's `answer` column as a keyword)."""
    from llm_stages.rollout.rewards import answer_match as ours

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return ours(texts, answers=answer)


class _ClockCallback(TrainerCallback):
    """One clock step per optimiser step: on_step_begin comes after the step's batches are fetched
    and on_step_end after the optimiser and scheduler step, as Lightning's batch hooks on our side."""

    def __init__(self, clock: StepClock, marks: dict):
        self.clock, self.marks = clock, marks

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.begin()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step is over when its kernels are, not when they are queued
        if "update_started" in self.marks:  # GRPO: everything after the rollout was scored
            self.clock.add(update_seconds=time.perf_counter() - self.marks.pop("update_started"))
        self.clock.end()


def _instrumented(base, clock: StepClock, marks: dict, *, in_order: bool, pairs: bool):
    from torch.utils.data import SequentialSampler

    class Instrumented(base):
        def _get_train_sampler(self, dataset=None):
            if in_order:
                return SequentialSampler(dataset if dataset is not None else self.train_dataset)
            return super()._get_train_sampler(dataset)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset  # DPO on our token ids
            return super()._prepare_dataset(dataset, *args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if isinstance(inputs, dict) and "input_ids" in inputs:
                ids = inputs["input_ids"]
                if "attention_mask" in inputs:
                    tokens = int(inputs["attention_mask"].sum())
                else:  # padding-free packing: one row of real tokens
                    tokens = ids.numel()
                if pairs:
                    samples = ids.shape[0] // 2  # chosen rows, then rejected rows
                elif "cu_seq_lens_q" in inputs:
                    samples = inputs["cu_seq_lens_q"].numel() - 1  # conversations in the flattened row
                else:
                    samples = ids.shape[0]
                clock.add(tokens=tokens, samples=samples)
            return super().training_step(model, inputs, num_items_in_batch)

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            prompt, generated = int(out["prompt_mask"].sum()), int(out["completion_mask"].sum())
            clock.add(tokens=prompt + generated, samples=out["completion_mask"].shape[0], generated_tokens=generated,
                      update_tokens=prompt + generated)
            marks["update_started"] = time.perf_counter()
            return out

    Instrumented.__name__ = base.__name__
    return Instrumented


def _timed_generate(model, clock: StepClock):
    """Wrap `model.generate` to add its wall time to the current step (TRL generates with the model
    itself on a single device, see unwrap_model_for_generation)."""
    original = model.generate

    def generate(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        clock.add(generation_seconds=time.perf_counter() - started)
        return out

    model.generate = generate


def run(spec: dict) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    w, gpu = spec["workload"], spec["trainer"] == "gpu"
    o = w["options"]
    with open(spec["baseline_rows"]) as f:
        rows = [json.loads(line) for line in f]
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    common = dict(
        output_dir=spec["run_dir"], max_steps=spec["optimiser_steps"], per_device_train_batch_size=w["batch_size"],
        gradient_accumulation_steps=1, learning_rate=w["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=spec["optim"]["weight_decay"], adam_beta1=spec["optim"]["betas"][0],
        adam_beta2=spec["optim"]["betas"][1], adam_epsilon=spec["optim"]["eps"],
        max_grad_norm=spec["optim"]["max_grad_norm"], seed=spec["seed"],
        optim="adamw_torch_fused" if spec["optim"]["fused"] else "adamw_torch",
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        # TRL turns (gradient) checkpointing on by default; ours is off unless model.gradient_checkpointing=true:
        # both follow the workload (non-reentrant, as ours).
        activation_checkpointing=bool(o.get("gradient_checkpointing")),
        activation_checkpointing_kwargs={"use_reentrant": False},
        # bf16 autocast with fp32 weights on GPUs (our trainer=gpu is bf16-mixed); fp32 on CPU.
        bf16=gpu, use_cpu=not gpu, dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )
    clock, marks = StepClock(), {}
    extra: dict = {}
    stage = w["stage"]
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, max_length=w["max_length"], packing=bool(o.get("packing")))
        base, in_order, pairs = SFTTrainer, not o.get("packing"), False
        dataset = Dataset.from_list(rows)
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common, max_length=w["max_length"])
        base, in_order, pairs = RewardTrainer, True, True
        dataset = Dataset.from_list(rows)
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, max_length=w["max_length"], beta=o["beta"], loss_type=["sigmoid"],
                         precompute_ref_log_probs=o["ref"] == "precompute", precompute_ref_batch_size=w["batch_size"])
        base, in_order, pairs = DPOTrainer, True, True
        dataset = Dataset.from_list(rows)
    elif stage == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        # One rollout of batch_size prompts x num_generations replies per optimiser step, used once: as ours
        # with mini_batch_size = the whole rollout and ppo_epochs=1.
        args = GRPOConfig(**{**common, "per_device_train_batch_size": w["batch_size"] * o["num_generations"]},
                          num_generations=o["num_generations"], max_completion_length=o["max_new_tokens"],
                          temperature=o["temperature"], top_p=1.0, top_k=0, steps_per_generation=1, num_iterations=1,
                          beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", shuffle_dataset=False)
        base, in_order, pairs = GRPOTrainer, False, False
        dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
        extra["reward_funcs"] = [answer_match]
    else:
        raise SystemExit(f"no TRL counterpart for stage {stage}")

    trainer = _instrumented(base, clock, marks, in_order=in_order, pairs=pairs)(
        model=spec["checkpoint"], args=args, train_dataset=dataset, processing_class=tokenizer, **extra)
    trainer.add_callback(_ClockCallback(clock, marks))
    if stage == "grpo":
        _timed_generate(trainer.model, clock)
    trainer.train()
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    clock.dump(spec["result_path"], cuda_max_allocated_mb=cuda)
