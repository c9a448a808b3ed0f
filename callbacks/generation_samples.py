"""Greedy generations from fixed prompts during training, to read what the model actually says."""

from __future__ import annotations

import lightning as L
import torch

from llm_stages.training.sharding import generation_context, is_sharded
from llm_stages.training.tables import record_table

DEFAULT_PROMPTS = ["What is 12 + 30?", "Compute 45 - 17.", "Calculate 8 plus 67.", "Write one sentence about rivers."]


class GenerationSamples(L.Callback):
    """Every `every_n_steps` optimiser steps and at the end of training, generate greedily from
    each prompt (rendered with the chat template) and record (step, prompt, completion): appended
    to `<run dir>/samples.jsonl` and, with the W&B logger, logged as the table `samples`.
    Skipped for models that cannot generate (the reward model's scalar head)."""

    def __init__(self, prompts: list[str] | None = None, every_n_steps: int = 100, max_new_tokens: int = 32):
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens
        self.rows: list[list] = []
        # Kept on every rank (rows only on rank 0): under sharding all ranks must sample together.
        self._sampled_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # RL stages take several optimiser steps per batch, so global_step may jump past a multiple.
        if self.every_n_steps and trainer.global_step - (self._sampled_at or 0) >= self.every_n_steps:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._sampled_at != trainer.global_step:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer, pl_module) -> list[list]:
        model, tokenizer = pl_module.model, pl_module.tokenizer
        self._sampled_at = trainer.global_step
        # A sharded model's forward needs every rank (each gathers weights from the others), so then
        # every rank generates; rank 0 alone records.
        if not model.can_generate() or not (trainer.is_global_zero or is_sharded(model)):
            return []
        was_training = model.training
        model.eval()
        rows = []
        for prompt in self.prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=pl_module.device)
            with generation_context(model):
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                     do_sample=False, use_cache=True, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            rows.append([trainer.global_step, prompt, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)])
        model.train(was_training)
        if not trainer.is_global_zero:
            return []
        self.rows += rows
        record_table(trainer, "samples", ["step", "prompt", "completion"], rows, self.rows)
        return rows

