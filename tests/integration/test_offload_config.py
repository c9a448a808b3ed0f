"""trainer=deepspeed_offload: ZeRO-3 with optimizer state and weights on CPU, for one GPU; composes
(deepspeed itself is CUDA-only and not installed here), and stage 2 with optimizer offload only is
one override away."""

from __future__ import annotations

from omegaconf import OmegaConf


def test_deepspeed_offload_composes_as_zero3_with_cpu_offload(make_cfg):
    cfg = make_cfg("stage=sft", "trainer=deepspeed_offload", quiet=False)
    OmegaConf.resolve(cfg)
    ds = OmegaConf.to_container(cfg.trainer.strategy.config)
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert cfg.trainer.devices == 1 and cfg.trainer.precision == "bf16-mixed"
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True  # the deepspeed config's settings kept
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["zero_allow_untested_optimizer"] is True
    assert "gradient_clipping" not in ds  # the stage sets it from optim.max_grad_norm


def test_deepspeed_offload_of_the_optimizer_state_only(make_cfg):
    cfg = make_cfg("stage=dpo", "trainer=deepspeed_offload", "trainer.strategy.config.zero_optimization.stage=2",
                   "~trainer.strategy.config.zero_optimization.offload_param", quiet=False)
    zero = OmegaConf.to_container(cfg.trainer.strategy.config.zero_optimization)
    assert zero["stage"] == 2 and "offload_param" not in zero and zero["offload_optimizer"]["device"] == "cpu"
