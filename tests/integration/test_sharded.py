"""The sharding pieces that need no processes: checkpoint directories, refused combinations, the DeepSpeed
clipping hand-over, the decoder-layer policy (tests/e2e/test_sharded.py trains FSDP1 and FSDP2 on two ranks)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm_stages.errors import ConfigError
from llm_stages.training.strategies import DeepSpeed, check_fsdp1
from llm_stages.train import build, resolve_checkpoint


def test_checkpoint_directories_resolve_like_files(make_cfg, tmp_path):
    """Sharded strategies write `last.ckpt` as a directory: ckpt_path=last and resume=auto take it,
    resume=auto ordered by the newest file inside."""
    cfg = make_cfg("stage=sft", "ckpt_path=last")
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    (checkpoints / "last.ckpt").mkdir(parents=True)
    (checkpoints / "last.ckpt" / "meta.pt").write_bytes(b"")
    assert resolve_checkpoint(cfg) == str(checkpoints / "last.ckpt")

    old_file = checkpoints / "step000003.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, old_file)  # resume takes only a readable checkpoint
    os.utime(old_file, (1, 1))
    auto = make_cfg("stage=sft", "resume=auto")
    assert resolve_checkpoint(auto) == str(checkpoints / "last.ckpt")
    os.utime(checkpoints / "last.ckpt" / "meta.pt", (0, 0))
    os.utime(checkpoints / "last.ckpt", (0, 0))
    assert resolve_checkpoint(auto) == str(old_file)


def test_fsdp1_refuses_rl_stages(make_cfg):
    reward = "{weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.demo_equation, _partial_: true}}"
    ppo = ["stage=ppo", f"+rollout.rewards.equation={reward}"]
    module, _ = build(make_cfg(*ppo))
    with pytest.raises(ConfigError, match="use trainer=fsdp2"):
        check_fsdp1(module)
    check_fsdp1(build(make_cfg("stage=sft"))[0])  # SFT is fine


def test_deepspeed_clips_to_optim_max_grad_norm(make_cfg):
    """DeepSpeed clips inside engine.step(): the stage hands it optim.max_grad_norm, and refuses a
    DeepSpeed config that says otherwise."""
    module, _ = build(make_cfg("stage=sft", "optim.max_grad_norm=0.5"))
    strategy = SimpleNamespace(config={"gradient_clipping": 0.0})  # what Lightning fills in by default
    DeepSpeed(strategy).hand_over_clipping(module.optim_cfg.max_grad_norm)
    assert strategy.config["gradient_clipping"] == 0.5
    with pytest.raises(ConfigError, match="gradient_clipping"):
        DeepSpeed(SimpleNamespace(config={"gradient_clipping": 2.0})).hand_over_clipping(module.optim_cfg.max_grad_norm)


def test_decoder_layers_come_from_no_split_modules(make_cfg):
    from llm_stages.training.sharding import DecoderLayerPolicy, decoder_layer_names, decoder_layers

    module, _ = build(make_cfg("stage=sft"))
    assert decoder_layer_names(module.model) == {"Qwen2DecoderLayer"}
    assert len(decoder_layers(module.model)) == 2
    policy = DecoderLayerPolicy()._run_policy(module, set(), {})  # resolved on the wrapped module itself
    assert {type(m).__name__ for m in policy} == {"Qwen2DecoderLayer"}
    with pytest.raises(ConfigError, match="NoSuchLayer"):
        decoder_layers(module.model, ["NoSuchLayer"])
