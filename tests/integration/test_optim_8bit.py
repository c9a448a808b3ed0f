"""8-bit AdamW through bitsandbytes: `optim=adamw8bit` trains on CPU with 8-bit state; the paged
variant needs CUDA and says so in one line."""

from __future__ import annotations

import pytest
import torch

from llm_stages.errors import ConfigError
from llm_stages.train import build, train


def test_adamw8bit_trains_two_steps(make_cfg):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg("stage=sft", "optim=adamw8bit", "trainer.max_steps=2", "optim.warmup_steps=0")
    assert cfg.optim.name == "adamw8bit" and cfg.optim.lr == 1e-3  # the rest as optim=adamw
    metrics = train(cfg)
    assert metrics["steps"] == 2 and 0 < metrics["train/loss"] < 20


def test_adamw8bit_keeps_8bit_moments_and_moves_the_weights(make_cfg):
    bnb = pytest.importorskip("bitsandbytes")
    from llm_stages.training.optim import OptimConfig, build_optimizer

    module, _ = build(make_cfg("stage=sft"))
    optimizer, _ = build_optimizer(module.model, OptimConfig(name="adamw8bit", lr=1e-2), total_steps=2)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    embedding = module.model.get_input_embeddings().weight
    before = embedding.detach().clone()
    for _ in range(2):
        ids = torch.randint(0, embedding.shape[0], (2, 12))
        module.model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8  # 1 byte per element, not 4
    assert not torch.equal(embedding, before)


def test_paged_adamw8bit_on_cpu_is_one_clear_error(make_cfg):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ConfigError, match=r"optim=paged_adamw8bit .* needs the parameters on a CUDA GPU .* optim=adamw8bit"):
        train(make_cfg("stage=sft", "optim=paged_adamw8bit", "trainer.max_steps=1"))


def test_an_unknown_optimizer_name_is_one_clear_error(make_cfg):
    with pytest.raises(ConfigError, match=r"optim.name must be one of \['adamw', 'adamw8bit', 'paged_adamw8bit'\]"):
        train(make_cfg("stage=sft", "optim.name=sgd", "trainer.max_steps=1"))
