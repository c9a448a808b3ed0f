"""Memory savers change nothing but memory: gradient checkpointing gives the same loss and gradients
(SFT and an RL update), RL generation still uses the KV cache under it, and every run reports its
peak memory."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from llm_stages.train import build, train

DIGIT_REWARD = ("+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, "
                "_partial_: true, pattern: '.*[0-9].*'}}")
# One GRPO iteration = one optimiser step: 2 prompts x 4 replies in one minibatch, one epoch.
GRPO = ["stage=grpo", "module.num_generations=4", "datamodule.batch_size=2", "module.mini_batch_size=8",
        "module.ppo_epochs=1", "rollout.generation.max_new_tokens=8", DIGIT_REWARD]


def _checkpointing(on: bool) -> str:
    return f"model.gradient_checkpointing={str(on).lower()}"


def _count_calls(module: torch.nn.Module) -> list[int]:
    """A counter of `module`'s forward calls. Checkpointing re-runs a layer's forward during backward
    (as far as the gradient needs: the attention of a decoder layer, at least)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_gives_the_same_sft_loss_and_gradients(make_cfg):
    results = {}
    for on in (False, True):
        module, datamodule = build(make_cfg("stage=sft", "datamodule.length_groups=1", _checkpointing(on)))  # same seed: same initial weights
        datamodule.setup("fit")
        [batch] = next(iter(datamodule.train_dataloader()))  # grad_accum=1: one micro-batch
        module.model.train()
        calls = _count_calls(module.model.model.layers[0].self_attn)
        loss = module.loss_sum(batch)[0] / module.loss_weight(batch)
        loss.backward()
        assert module.model.is_gradient_checkpointing == on
        assert calls[0] == (2 if on else 1)  # checkpointing really recomputed the layer
        results[on] = loss.detach(), {n: p.grad for n, p in module.named_parameters()}
    (loss_off, grads_off), (loss_on, grads_on) = results[False], results[True]
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=0)
    assert grads_off.keys() == grads_on.keys() and all(g is not None for g in grads_off.values())
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5, msg=name)


class FirstStep(L.Callback):
    """The gradients of the first optimiser step and the logged train/loss."""

    def __init__(self):
        self.grads, self.loss = None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = float(trainer.callback_metrics["train/loss"])


def test_gradient_checkpointing_gives_the_same_grpo_iteration(make_cfg):
    """A whole GRPO iteration (sample in eval mode, score, one update in train mode) gives the same
    loss and gradients with checkpointing on: the replies are the same and so is the update."""
    results = {}
    for on in (False, True):
        cfg = make_cfg(*GRPO, _checkpointing(on), "trainer.max_steps=1", "optim.max_grad_norm=null")
        module, datamodule = build(cfg)
        step = FirstStep()
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[step], enable_checkpointing=False,
                  default_root_dir=cfg.paths.output_dir,  # rollouts.jsonl goes to the run dir, not the repo
                  enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                  limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=datamodule)
        assert module.model.is_gradient_checkpointing == on
        results[on] = step
    off, on = results[False], results[True]
    assert off.grads and any(g.abs().max() > 0 for g in off.grads.values())  # rewards varied: a real gradient
    assert on.loss == pytest.approx(off.loss, abs=1e-6)
    assert on.grads.keys() == off.grads.keys()
    for name in off.grads:
        torch.testing.assert_close(on.grads[name], off.grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rl_generation_uses_the_kv_cache_under_gradient_checkpointing(make_cfg):
    """Checkpointing layers drop the KV cache in training mode; `sample` switches to eval mode, so
    each generated token is one forward pass of one new token over a cache that grows by one."""
    replies = {}
    for on in (False, True):
        module, datamodule = build(make_cfg(*GRPO, _checkpointing(on)))
        datamodule.setup("fit")
        [prompts] = next(iter(datamodule.train_dataloader()))
        width = prompts.input_ids.shape[1]
        module.model.train()  # as during a training step
        seen = []  # (tokens fed in, cache length after) of every forward pass of the decoder

        def record(decoder, args, kwargs, out):
            cache = out.past_key_values
            seen.append((kwargs["input_ids"].shape[1], cache.get_seq_length() if cache is not None else 0))

        module.model.model.register_forward_hook(record, with_kwargs=True)
        response = module.rollout.sampler.sample(module.model, prompts, generation={"max_new_tokens": 8, "do_sample": False},
                                                 seed=0).response
        assert module.model.training  # sample() restored training mode
        assert len(seen) == response.shape[1] >= 2
        assert seen == [(width, width)] + [(1, width + k) for k in range(1, len(seen))], seen
        replies[on] = response

        if on:  # the failure this guards against: in training mode the layers drop the cache
            seen.clear()
            module.model.generate(input_ids=prompts.input_ids[:1], attention_mask=prompts.attention_mask[:1], max_new_tokens=2,
                                  do_sample=False, use_cache=True, pad_token_id=module.tokenizer.pad_token_id)
            assert seen[0][1] == 0
    assert torch.equal(replies[True], replies[False])


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_peak_memory_is_logged_returned_and_printed(make_cfg, caplog, stage):
    overrides = {"sft": ["stage=sft"], "grpo": [*GRPO, "datamodule.val_batch_size=4"]}[stage]
    cfg = make_cfg(*overrides, "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
                   "validate_before_fit=false", "export.enabled=false", "logger=csv",
                   "+callbacks.throughput._target_=callbacks.throughput.ThroughputMonitor")
    with caplog.at_level(logging.INFO, logger="llm_stages.train"):
        metrics = train(cfg)
    # A Python process with torch loaded holds well over 50 MiB and (here) far less than 64 GiB:
    # the bounds also catch a wrong unit (ru_maxrss is KiB on Linux).
    assert 0.05 < metrics["perf/peak_rss_gb"] < 64
    assert ("perf/cuda_max_allocated_gb" in metrics) == torch.cuda.is_available()
    [metrics_csv] = Path(cfg.paths.output_dir).glob("csv/**/metrics.csv")
    logged = [float(r["perf/peak_rss_gb"]) for r in csv.DictReader(metrics_csv.open()) if r.get("perf/peak_rss_gb")]
    assert len(logged) == 2 and all(0.05 < v <= metrics["perf/peak_rss_gb"] for v in logged)  # each step, a peak so far
    assert f"peak memory: {metrics['perf/peak_rss_gb']:.2f} GiB RSS" in caplog.text
