"""The config groups for what stages share (conf/rollout/, conf/datamodule/) compose exactly the values
the stage files spelled out before, and conf/debug/ gives the tests' tiny quiet runs to people too."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from llm_stages.config import compose

# The `rollout:` nodes stage=ppo and stage=grpo composed when each stage file wrote out the whole block.
VLLM = ("{address: null, authkey: null, dtype: null, gpu_memory_utilization: 0.3, importance_sampling: token_truncate, "
        "importance_sampling_cap: 2.0, kv_cache_gb: 1, max_model_len: null, python: null, startup_timeout: 300}")
# The episode settings (docs/agents.md), added with multi-turn episodes.
EPISODES = ("tools: [], environment: null, context_overflow_reward: 0.0, episode: {max_turns: 4, max_tool_calls: 8, "
            "max_turn_tokens: null, max_episode_tokens: null, tool_timeout: 10, max_context: null, tool_parser: null}")
ROLLOUT = ("{_partial_: true, _target_: llm_stages.rollout.rollout.Rollout, backend: hf, generation: {batch_size: null, "
           "do_sample: true, max_new_tokens: 64, temperature: TEMPERATURE, top_k: 0, top_p: 1.0}, missing_eos_penalty: null, "
           "overlong_buffer: null, overlong_penalty_factor: 1.0, reward_model: {dtype: '${model.dtype}', name: reward_model, "
           "path: null, weight: 1.0}, rewards: REWARDS, val_generation: {do_sample: false}, vllm: " + VLLM + ", " + EPISODES + "}")
EXPECTED_ROLLOUT = {
    "ppo": ROLLOUT.replace("TEMPERATURE", "0.7").replace("REWARDS", "{}"),
    "grpo": ROLLOUT.replace("TEMPERATURE", "1.0").replace(
        "REWARDS", "{correct: {fn: {_partial_: true, _target_: llm_stages.rollout.rewards.answer_match}, weight: 1.0}}"),
}
# The `datamodule:` nodes of the pair and unpaired stages, as their stage files spelled them out.
SEQUENCES = ("batch_size: 8, grad_accum: 1, group_by_length: false, length_group_cost: 64, length_groups: 4, max_length: 512, "
             "max_prompt_length: 256, num_workers: 0, val_batch_size: 16")
PAIRS = ("{_target_: llm_stages.data.datamodule.PairDataModule, " + SEQUENCES +
         ", pack_pairs: true, share_prompt: auto, share_prompt_min_saving: 0.2, too_long: truncate}")
EXPECTED_DATAMODULE = {"dpo": PAIRS, "rm": PAIRS,
                       "kto": "{_target_: llm_stages.data.datamodule.UnpairedDataModule, " + SEQUENCES + "}"}


def _compose(tmp_path, *overrides):
    return compose([f"paths.log_dir={tmp_path}/runs", *overrides], output_dir=str(tmp_path / "run"))


def _node(cfg, key) -> dict:
    return OmegaConf.to_container(cfg[key], resolve=False)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_stages_compose_the_same_rollout_from_the_rollout_group(tmp_path, stage):
    cfg = _compose(tmp_path, f"stage={stage}")
    assert _node(cfg, "rollout") == yaml.safe_load(EXPECTED_ROLLOUT[stage])
    assert cfg.module.rollout.generation.temperature == {"ppo": 0.7, "grpo": 1.0}[stage]  # module reads it


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rollout_vllm_changes_only_the_backend_and_keeps_the_stage_settings(tmp_path, stage):
    hf = _node(_compose(tmp_path, f"stage={stage}"), "rollout")
    vllm = _node(_compose(tmp_path, f"stage={stage}", "rollout=vllm", "rollout.vllm.gpu_memory_utilization=0.5"), "rollout")
    assert vllm["backend"] == "vllm" and vllm["vllm"]["gpu_memory_utilization"] == 0.5
    assert {**vllm, "backend": "hf", "vllm": hf["vllm"]} == hf


@pytest.mark.parametrize("stage", ["dpo", "rm", "kto"])
def test_preference_stages_compose_the_same_datamodule_from_the_datamodule_group(tmp_path, stage):
    cfg = _compose(tmp_path, f"stage={stage}", "datamodule.batch_size=4")
    assert _node(cfg, "datamodule") == {**yaml.safe_load(EXPECTED_DATAMODULE[stage]), "batch_size": 4}


def test_debug_tiny_is_the_tests_model_and_quiet_run(tmp_path):
    """debug=tiny composes what the tests spelled out as override lists; later overrides still win."""
    spelled_out = ["model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
                   "model.init.num_attention_heads=2", "model.init.num_key_value_heads=1", "logger=none", "callbacks=none",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    for stage in ("sft", "grpo"):
        assert (OmegaConf.to_container(_compose(tmp_path, f"stage={stage}", "debug=tiny"))
                == OmegaConf.to_container(_compose(tmp_path, f"stage={stage}", *spelled_out)))
    cfg = _compose(tmp_path, "debug=tiny", "logger=csv", "trainer.enable_progress_bar=true")
    assert list(cfg.logger) == ["csv"] and cfg.trainer.enable_progress_bar and cfg.model.init.num_hidden_layers == 2


def test_debug_fast_dev_run_and_overfit(tmp_path):
    fast = _compose(tmp_path, "stage=sft", "debug=fast_dev_run")
    assert fast.trainer.fast_dev_run is True and not fast.export.enabled and not fast.validate_before_fit and not fast.logger
    overfit = _compose(tmp_path, "stage=dpo", "debug=overfit", "datamodule.batch_size=4")
    assert OmegaConf.to_container(overfit.data.sources, resolve=True) == [{"path": overfit.data.path}]
    assert overfit.data.mix_size == 4 and overfit.trainer.limit_val_batches == 0 and not overfit.export.enabled
