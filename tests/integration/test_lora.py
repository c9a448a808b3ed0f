"""LoRA and QLoRA on the tiny model: adapters train, the base stays frozen, the reference is the
adapter-disabled base, and both export forms (merged model, adapter alone) reproduce the trained
model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from llm_stages.adapters import is_adapted
from llm_stages.training.export import export_hf
from llm_stages.models import load_model
from llm_stages.train import build, train

PEFT = {"lora": ["peft=lora"], "qlora": ["peft=qlora"]}
# The merged export is float; the adapted QLoRA model dequantises in its 4-bit matmul: same numbers
# up to float32 summation order.
TOLERANCE = {"lora": 1e-5, "qlora": 1e-4}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny base checkpoint, so adapter exports name a base that can be loaded again."""
    from tests.conftest import TEST_MODEL

    init = {o.split("=")[0].removeprefix("model.init."): int(o.split("=")[1]) for o in TEST_MODEL}
    cfg = OmegaConf.create({"name": "tiny", "init": {**init, "tie_word_embeddings": True}})
    torch.manual_seed(0)
    return export_hf(load_model(cfg, tokenizer), tokenizer, tmp_path_factory.mktemp("base") / "export")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sft_adapter_trains_and_merged_export_matches(make_cfg, tmp_path, base_dir, method):
    cfg = make_cfg("stage=sft", f"model.path={base_dir}", *PEFT[method], "peft.r=8", "peft.dropout=0.0",
                   "trainer.max_steps=30", "trainer.val_check_interval=30", "optim.lr=2e-2", "callbacks=default",
                   output_dir=tmp_path / method)
    module, _ = build(cfg)
    assert is_adapted(module.model)
    if method == "qlora":
        import bitsandbytes as bnb

        layers = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    metrics = train(cfg)
    # Measured: 6.93 -> 6.69 (LoRA on a random base moves slowly; full fine-tuning gets to ~5 here).
    assert metrics["val/loss"] < metrics["val/loss_before"] - 0.1

    # The checkpoint holds the adapter only; the frozen (4-bit) base comes back from the config.
    state = torch.load(tmp_path / method / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(".lora_" in k for k in state)

    # Rebuild the trained model from its checkpoint and compare with the merged export.
    module, datamodule = build(cfg)
    module.load_state_dict(state, strict=False)
    merged = AutoModelForCausalLM.from_pretrained(metrics["export_dir"])
    assert not is_adapted(merged) and getattr(merged.config, "quantization_config", None) is None
    input_ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged, input_ids), _logits(module.model, input_ids),
                               atol=TOLERANCE[method], rtol=TOLERANCE[method])
    # ... and the training changed them.
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert (_logits(base, input_ids) - _logits(merged, input_ids)).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_alone_export_loads_with_peft(make_cfg, tmp_path, base_dir, method):
    from peft import PeftModel

    metrics = train(make_cfg("stage=sft", f"model.path={base_dir}", *PEFT[method], "export.merge_lora=false",
                             "trainer.max_steps=4", "optim.lr=5e-3", "validate_before_fit=false",
                             "trainer.limit_val_batches=0", "callbacks=default", output_dir=tmp_path / method))
    export = Path(metrics["export_dir"])
    assert (export / "adapter_config.json").is_file() and not (export / "config.json").exists()
    assert (export / "tokenizer_config.json").is_file()
    cfg = make_cfg("stage=sft", f"model.path={base_dir}", *PEFT[method])
    module, _ = build(cfg)
    state = torch.load(tmp_path / method / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=False)
    base = build(make_cfg("stage=sft", f"model.path={base_dir}", *PEFT[method]))[0].model.get_base_model()
    loaded = PeftModel.from_pretrained(base, export)
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(module.model, input_ids), atol=1e-5, rtol=1e-5)
    # A later stage refuses an adapter alone as model.path, naming the fix.
    from llm_stages.errors import ConfigError

    with pytest.raises(ConfigError, match="export.merge_lora=true"):
        build(make_cfg("stage=dpo", f"model.path={export}"))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_under_an_adapter_uses_the_disabled_adapter_as_reference(make_cfg, tmp_path, base_dir, method):
    cfg = make_cfg("stage=dpo", f"model.path={base_dir}", *PEFT[method], "module.ref=copy", "trainer.max_steps=15",
                   "trainer.val_check_interval=15", "optim.lr=5e-3", output_dir=tmp_path / method)
    module, _ = build(cfg)
    assert module.reference is None  # no second copy of the weights
    metrics = train(cfg)
    assert metrics["val/loss_before"] == pytest.approx(0.693147, abs=1e-5)  # fresh adapter: policy == base
    # The adapter moves the policy towards the chosen replies of its batches (the random base does not
    # generalise to held-out pairs in 15 steps, so only training metrics are asserted).
    assert metrics["train/loss"] < 0.693 and metrics["train/rewards/margins"] > 0


def test_rl_under_lora_reference_is_the_base_and_critic_has_its_own_adapter(make_cfg, tmp_path, base_dir):
    from tests.integration.test_rl_stages import PPO

    cfg = make_cfg(*PPO, f"model.path={base_dir}", "peft=lora", "trainer.max_steps=4", "module.export_critic=true",
                   "trainer.limit_val_batches=1", output_dir=tmp_path / "ppo")
    module, _ = build(cfg)
    assert module.reference is None and is_adapted(module.model) and is_adapted(module.critic)
    assert all(not p.requires_grad for n, p in module.critic.named_parameters() if ".lora_" not in n and "score" not in n)
    metrics = train(cfg)
    assert metrics["steps"] == 4 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (Path(metrics["export_dir"]) / "config.json").is_file()
    assert (Path(metrics["critic_export_dir"]) / "config.json").is_file()  # merged value model

    grpo = make_cfg("stage=grpo", f"model.path={base_dir}", "peft=lora", "module.beta=0.04", "trainer.max_steps=2",
                    "module.num_generations=2", "module.mini_batch_size=8", "datamodule.batch_size=4",
                    "trainer.limit_val_batches=0", "validate_before_fit=false",
                    "+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, "
                    "_partial_: true, pattern: '.*[0-9].*'}}", output_dir=tmp_path / "grpo")
    module, _ = build(grpo)
    assert module.reference is None
    assert train(grpo)["steps"] == 2


def test_reference_logits_are_the_base_model_logits(make_cfg, base_dir):
    """The disabled adapter gives exactly the base model, even after the adapter has moved."""
    from llm_stages.adapters import reference_of

    module, _ = build(make_cfg("stage=sft", f"model.path={base_dir}", "peft=lora"))
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    input_ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    module.model.train()
    with reference_of(module.model, None) as reference:
        ref = reference(input_ids=input_ids).logits
    assert module.model.training  # restored
    base = _logits(AutoModelForCausalLM.from_pretrained(base_dir), input_ids)
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)
    assert (_logits(module.model, input_ids) - base).abs().max() > 1e-3


def test_reward_model_under_lora_trains_its_head_and_exports_the_same_scores(make_cfg, tmp_path, base_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from llm_stages.data.kinds.pair import collate_pairs

    cfg = make_cfg("stage=rm", f"model.path={base_dir}", "peft=lora", "trainer.max_steps=4", "optim.lr=5e-3",
                   "validate_before_fit=false", "trainer.limit_val_batches=0", "callbacks=default",
                   output_dir=tmp_path / "rm")
    module, _ = build(cfg)
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained) and all(".lora_" in n or "score" in n for n in trained)
    metrics = train(cfg)
    module, datamodule = build(cfg)
    module.load_state_dict(torch.load(tmp_path / "rm" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"],
                           strict=False)
    module.eval()
    datamodule.setup()
    batch = collate_pairs(datamodule.val_set[:4], tokenizer.pad_token_id)
    exported = AutoModelForSequenceClassification.from_pretrained(metrics["export_dir"]).eval()
    with torch.no_grad():
        ours = torch.cat(module.rewards(batch))
        theirs = exported(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
