"""The chunked LM head changes no number: every stage's first optimiser step (loss, logged statistics,
gradients) is the same with `model.chunked_lm_head` on and off, and with it on the LM head never runs
over more than one position inside the model's forward."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from llm_stages.losses import chunked
from llm_stages.losses.chunked import chunked_head
from llm_stages.train import build

DIGIT_REWARD = ("+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, "
                "_partial_: true, pattern: '.*[0-9].*'}}")
RL = ["rollout.generation.max_new_tokens=8", "datamodule.batch_size=2", "validate_before_fit=false", DIGIT_REWARD]
STAGES = {
    "sft": ["stage=sft"],
    "pt": ["stage=pt", "datamodule.block_size=64"],
    "sft_lora": ["stage=sft", "peft=lora"],
    "dpo": ["stage=dpo", "datamodule.share_prompt=false"],
    "dpo_shared_prompt": ["stage=dpo", "datamodule.share_prompt=true"],
    "dpo_ref_copy": ["stage=dpo", "module.ref=copy"],
    "kto": ["stage=kto", "datamodule.batch_size=4"],
    "ppo": ["stage=ppo", "module.mini_batch_size=2", *RL],
    "grpo": ["stage=grpo", "module.num_generations=4", "module.mini_batch_size=8", "rollout.generation.temperature=0.7",
             *RL],
}


LOGGED = ("train", "ppo", "grpo", "rewards", "logps", "logits", "kl")  # the statistics the stages log


class FirstStep(L.Callback):
    """The gradients of the first optimiser step and the metrics logged by it."""

    def __init__(self):
        self.grads, self.metrics = None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.metrics is None:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(LOGGED)}


def first_step(cfg) -> tuple[FirstStep, list[int], torch.nn.Module]:
    module, datamodule = build(cfg)
    widths = []  # positions the LM head ran over in each training-mode forward (generation runs in eval mode)
    module.model.get_output_embeddings().register_forward_hook(
        lambda head, args, out: widths.append(args[0].shape[-2]) if module.model.training else None)
    step = FirstStep()
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[step], enable_checkpointing=False,
              default_root_dir=cfg.paths.output_dir, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=datamodule)
    return step, widths, module


@pytest.mark.parametrize("stage", list(STAGES))
def test_chunked_head_gives_the_same_first_step(make_cfg, stage):
    results = {}
    for on in (False, True):
        cfg = make_cfg(*STAGES[stage], f"model.chunked_lm_head={str(on).lower()}", "model.lm_head_chunk_size=5",
                       "trainer.max_steps=1", "optim.max_grad_norm=null")
        results[on] = first_step(cfg)
    (off, off_widths, off_module), (on, on_widths, on_module) = results[False], results[True]
    assert chunked_head(on_module.model) is not None and chunked_head(off_module.model) is None
    assert on_widths and set(on_widths) == {1} and max(off_widths) > 1
    assert off.metrics and off.metrics.keys() == on.metrics.keys()
    stat = {"dpo": "train/logits/chosen", "kto": "train/logits/chosen", "ppo": "ppo/entropy"}.get(stage.split("_")[0])
    assert stat is None or stat in off.metrics  # the mean logit and the entropy, computed in the chunks
    for name, value in off.metrics.items():
        assert on.metrics[name] == pytest.approx(value, abs=1e-5), name
    assert off.grads and off.grads.keys() == on.grads.keys()
    assert any(g.abs().max() > 0 for g in off.grads.values())
    for name in off.grads:
        torch.testing.assert_close(on.grads[name], off.grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_ppo_entropy_is_the_same_through_the_chunked_head(make_cfg):
    """Entropy and log-probs at the sampling temperature, from one set of replies, both ways."""
    module, datamodule = build(make_cfg(*STAGES["ppo"], "rollout.generation.temperature=0.7"))
    datamodule.setup("fit")
    [prompts] = next(iter(datamodule.train_dataloader()))
    sample = module.rollout.sampler.sample(module.model, prompts, generation=module.generation, seed=0)
    assert chunked_head(module.model) is not None
    chunked = module.response_logprobs(module.model, sample, with_entropy=True)
    module.model.lm_head_chunk_size = None  # the full-logits path
    full = module.response_logprobs(module.model, sample, with_entropy=True)
    for got, want in zip(chunked, full):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(full[1].max()) > 0.1


def test_a_lora_wrapped_lm_head_falls_back_to_the_full_logits_and_says_so(make_cfg, caplog, monkeypatch):
    monkeypatch.setattr(chunked, "_explained", set())  # said once per process: forget earlier tests'
    module, _ = build(make_cfg("stage=sft", "peft=lora", "peft.target_modules=[q_proj,lm_head]"))
    with caplog.at_level(logging.INFO, logger="llm_stages.losses.chunked"):
        assert chunked_head(module.model) is None
        assert chunked_head(module.model) is None
    said = [r.getMessage() for r in caplog.records if "chunked_lm_head" in r.getMessage()]
    assert len(said) == 1 and "not a plain linear layer" in said[0], said


def test_a_chunk_size_below_one_is_one_clear_error(make_cfg):
    from llm_stages.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.lm_head_chunk_size=0: expected an integer >= 1 .* model.chunked_lm_head=false"):
        build(make_cfg("stage=sft", "model.lm_head_chunk_size=0"))


def test_a_model_whose_logits_are_not_its_head_on_its_hidden_state_gets_the_full_logits(make_cfg, caplog, monkeypatch):
    """A softcap the model's forward does not apply stands for any architecture that transforms its
    logits further: the first forward finds the difference, and the numbers are the full path's."""
    monkeypatch.setattr(chunked, "_explained", set())
    module, datamodule = build(make_cfg("stage=sft", "datamodule.length_groups=1"))
    datamodule.setup("fit")
    [batch] = next(iter(datamodule.train_dataloader()))
    want = module.loss_sum(batch)[0]
    assert getattr(module.model, chunked.VERIFIED_ATTRIBUTE)  # checked once, and equal
    module.model.config.final_logit_softcapping = 0.5  # Qwen2's forward ignores it
    delattr(module.model, chunked.VERIFIED_ATTRIBUTE)
    with caplog.at_level(logging.INFO, logger="llm_stages.losses.chunked"):
        got = module.loss_sum(batch)[0]
    assert chunked_head(module.model) is None
    assert any("does not give its own logits" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
