"""Distill: a student learns a frozen teacher's next-token distributions (GKD; on-policy distillation).

Each optimiser step:
  1. Choose each micro-batch's completions: the dataset's (offline), the teacher's own replies to its
     prompts (`seq_kd`), or, with probability `lmbda`, the student's replies (on-policy; drawn by a
     seeded coin per step and micro-batch, so a resumed run makes the same choices).
  2. Run both models over the rows; take each one's last hidden state at the positions that predict
     a completion token (prompt and padding are never trained).
  3. Loss: the generalized JSD(beta) at `temperature` between the two distributions at those
     positions (llm_stages.losses.distill), averaged over completion tokens of the whole accumulated
     batch. The LM heads run on chunks of tokens, so no full-vocabulary logits tensor is held.

Student and teacher must share a vocabulary: a teacher whose tokenizer is the student's with a few
tokens added at the end (or the other way round) is aligned on the ids both know; any other
difference is refused at start.
"""

from __future__ import annotations

import random

import torch

from llm_stages.data.collate import CausalBatch
from llm_stages.data.kinds.prompt import PromptBatch
from llm_stages.errors import ConfigError
from llm_stages.losses.causal import IGNORE_INDEX
from llm_stages.losses.distill import DISTILL_RANGES, chunked_distillation
from llm_stages.ranges import check_ranges
from llm_stages.rollout.rollout import position_ids
from llm_stages.rollout.sampling import Sampler
from llm_stages.stages.base import Stage
from llm_stages.stages.teacher import load_teacher
from llm_stages.training.sharding import is_sharded


class Distill(Stage):
    fsdp1_unsupported = "the stage runs each model's LM head on chunks of hidden states, outside the model's forward"

    def __init__(self, model, tokenizer, optim, *, teacher, beta: float = 0.5, temperature: float = 1.0,
                 lmbda: float = 0.0, seq_kd: bool = False, generation: dict | None = None, chunk_size: int = 1024,
                 seed: int = 0):
        super().__init__(model, tokenizer, optim)
        check_ranges(dict(beta=beta, temperature=temperature, lmbda=lmbda, chunk_size=chunk_size), DISTILL_RANGES,
                     "module")
        self.beta, self.temperature, self.lmbda, self.seq_kd = beta, temperature, lmbda, seq_kd
        self.chunk_size, self.seed = chunk_size, seed
        self.teacher, self.vocab_size = load_teacher(teacher, tokenizer)
        self.sampler = Sampler(model, tokenizer, dict(generation or {})) if (lmbda > 0 or seq_kd) else None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.eval()  # dropout off: the teacher's distribution is a fixed target
        if self.sampler is not None and getattr(self.trainer.datamodule, "packing", False):
            raise ConfigError("module.lmbda > 0 or module.seq_kd=true samples replies to each row's prompt, which "
                              "packed rows do not have: set datamodule.packing=false")

    # -- 1. completions ------------------------------------------------------------------------
    def training_step(self, micro_batches: list, batch_idx: int) -> torch.Tensor:
        on_policy = [self.coin(i) for i in range(len(micro_batches))]
        micro_batches = [self.completions(mb, i, student) for i, (mb, student) in enumerate(zip(micro_batches, on_policy))]
        loss = super().training_step(micro_batches, batch_idx)
        self.log("train/distill_loss", loss)
        self.log("train/on_policy_fraction", sum(on_policy) / len(on_policy))
        return loss

    def coin(self, micro_batch: int) -> bool:
        """Whether this step's micro-batch is answered by the student: seeded, so a resume repeats it."""
        return self.lmbda > 0 and random.Random(f"{self.seed}/{self.global_step}/{micro_batch}").random() < self.lmbda

    def completions(self, batch: CausalBatch, micro_batch: int, on_policy: bool) -> CausalBatch:
        if not (on_policy or self.seq_kd):
            return batch
        prompts = prompt_batch(batch, self.tokenizer.pad_token_id)
        seed = self.seed + 7919 * self.global_step + micro_batch
        if self.seq_kd:  # the teacher's reply replaces the dataset's; on-policy replaces it in turn
            batch = sampled_batch(self.sampler.sample(self.teacher, prompts, generation=self.sampler.generation, seed=seed))
        if on_policy:
            batch = sampled_batch(self.sampler.sample(self.model, prompts, generation=self.sampler.generation, seed=seed))
        return batch

    # -- 2-3. the loss -------------------------------------------------------------------------
    def loss_sum(self, batch: CausalBatch):
        trained = batch.labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        student_hidden = last_hidden(self.model, **inputs)[:, :-1][trained]
        with torch.no_grad():
            teacher_hidden = last_hidden(self.teacher, **inputs)[:, :-1][trained]
        divergence, agree = chunked_distillation(
            student_hidden, teacher_hidden, lm_head(self.model, self.vocab_size), lm_head(self.teacher, self.vocab_size),
            beta=self.beta, temperature=self.temperature, chunk_size=self.chunk_size)
        return divergence, {"teacher_agreement": agree.float()}

    def loss_weight(self, batch: CausalBatch) -> torch.Tensor:
        return (batch.labels[:, 1:] != IGNORE_INDEX).sum()


def last_hidden(model, **inputs) -> torch.Tensor:
    """The final (normed) hidden state at every position; the LM head runs on one position only."""
    if is_sharded(model):
        raise ConfigError("stage=distill runs the LM head on chunks outside the model's forward, which a sharded "
                          "model (trainer=fsdp2|fsdp, DeepSpeed ZeRO-3) does not allow: use trainer=ddp or one device")
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def lm_head(model, vocab_size: int | None):
    """hidden -> logits over the shared vocabulary, with the model's final logit soft-capping if it has one."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        out = out[..., :vocab_size] if vocab_size is not None else out
        return torch.tanh(out / softcap) * softcap if softcap else out
    return logits


def prompt_batch(batch: CausalBatch, pad_id: int) -> PromptBatch:
    """Each row's prompt (the tokens before its first trained one), left-padded for generation."""
    trained = batch.labels != IGNORE_INDEX
    starts = torch.where(trained.any(1), trained.int().argmax(1), batch.attention_mask.sum(1))
    rows = [batch.input_ids[i, :int(n)] for i, n in enumerate(starts)]
    width = max(len(r) for r in rows)
    input_ids = batch.input_ids.new_full((len(rows), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):], attention_mask[i, width - len(row):] = row, 1
    return PromptBatch(input_ids, attention_mask, prompts=[], answers=[])


def sampled_batch(sample) -> CausalBatch:
    """Prompts and sampled replies as a training batch: only the reply tokens (through EOS) are trained."""
    labels = torch.cat([torch.full_like(sample.query, IGNORE_INDEX),
                        sample.response.masked_fill(sample.response_mask == 0, IGNORE_INDEX)], 1)
    return CausalBatch(sample.input_ids, sample.attention_mask, labels, position_ids(sample.attention_mask))
