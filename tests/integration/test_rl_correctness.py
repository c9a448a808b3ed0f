"""What PPO and GRPO must get right on real models: the reward model scored as it was trained,
sampling from the distribution the loss assumes, no dropout in the ratio; and DPO's cached
reference refusing changed data."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config

from llm_stages.data.kinds.pair import collate_pairs
from llm_stages.data.kinds.prompt import PromptExample, collate_prompts
from llm_stages.data.render import IGNORE_INDEX
from llm_stages.errors import ConfigError
from llm_stages.training.export import export_hf
from llm_stages.models import load_tokenizer
from llm_stages.rollout.rollout import Sample, Trajectory
from llm_stages.train import build, train
from tests.integration.test_rl_stages import GRPO, PPO, _fit


@pytest.fixture(scope="module")
def pad_is_eos_tokenizer(tmp_path_factory):
    """The tiny tokenizer with its EOS as pad token, as load_tokenizer makes it for tokenizers without one."""
    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    tokenizer.pad_token = tokenizer.eos_token
    path = tmp_path_factory.mktemp("pad_is_eos")
    tokenizer.save_pretrained(path)
    return path


# -- 1. the reward model ---------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["own_pad", "pad_is_eos"])
def test_rl_scores_replies_as_the_rm_stage_does(make_cfg, tmp_path, pad, pad_is_eos_tokenizer):
    tokenizer_override = [f"model.tokenizer={pad_is_eos_tokenizer}"] if pad == "pad_is_eos" else []
    rm = train(make_cfg("stage=rm", "trainer.max_steps=8", "optim.lr=1e-3", "validate_before_fit=false",
                        "trainer.limit_val_batches=0", *tokenizer_override, output_dir=tmp_path / "rm"))
    # The RM stage's scores of held-out pairs (its training and validation path).
    module, datamodule = build(make_cfg("stage=rm", f"model.path={rm['export_dir']}", output_dir=tmp_path / "score"))
    datamodule.setup("fit")
    tokenizer = module.tokenizer
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (pad == "pad_is_eos")
    pairs = datamodule.val_set[:8]
    with torch.no_grad():
        chosen, rejected = module.eval().rewards(collate_pairs(pairs, tokenizer.pad_token_id))

    # The same replies as a policy samples them: the prompt, then the reply's tokens through EOS.
    rl, _ = build(make_cfg(*GRPO, f"rollout.reward_model.path={rm['export_dir']}", *tokenizer_override,
                           output_dir=tmp_path / "rl"))
    rows = [row for pair in pairs for row in (pair.chosen, pair.rejected)]
    start = [row.labels.index(next(t for t in row.labels if t != IGNORE_INDEX)) for row in rows]
    prompts = collate_prompts([PromptExample(row.input_ids[:s], "", None) for row, s in zip(rows, start)],
                              tokenizer.pad_token_id)
    # A labelled reply runs through the template's text after its end-of-turn token (ChatML's "\n", as TRL
    # scores it); a policy stops at the end-of-turn token and the scorer appends that text itself.
    labelled = [[t for t in row.labels[s:] if t != IGNORE_INDEX] for row, s in zip(rows, start)]
    replies = [r[:r.index(tokenizer.eos_token_id) + 1] for r in labelled]
    width = max(map(len, replies))
    response = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in replies])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
    assert all(r[-1] == tokenizer.eos_token_id for r in replies)
    _, components, _ = rl.rollout.scorer.score([""] * len(rows), [None] * len(rows),
                                               Sample(prompts.input_ids, prompts.attention_mask, response, response_mask, None,
                                                      torch.zeros_like(response_mask)))
    torch.testing.assert_close(components["reward_model"], torch.stack([chosen, rejected], 1).flatten(),
                               atol=1e-5, rtol=1e-5)


# -- 2. the sampling distribution ------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory):
    """The same tiny policy twice: with a generation_config.json that sets a repetition penalty
    (and more), and without."""
    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    root = tmp_path_factory.mktemp("policies")
    plain = export_hf(model, tokenizer, root / "plain")
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 3
    model.generation_config.do_sample, model.generation_config.top_k = True, 20  # as Qwen2.5's generation_config.json
    return plain, export_hf(model, tokenizer, root / "penalised")


def test_sampling_ignores_the_checkpoints_generation_config(make_cfg, policy_dirs, caplog):
    plain, penalised = policy_dirs
    sampled = {}
    for name, path in (("plain", plain), ("penalised", penalised)):
        with caplog.at_level(logging.WARNING, logger="llm_stages.rollout.sampling"):
            module, datamodule = build(make_cfg(*GRPO, f"model.path={path}", "rollout.generation.max_new_tokens=24"))
        datamodule.setup("fit")
        [prompts] = next(iter(datamodule.train_dataloader()))
        sample = module.rollout.sampler.sample(module.model, prompts, repeats=4, generation=module.generation, seed=3)
        zeros = torch.zeros(sample.response.shape)
        trajectory = Trajectory.from_sample(sample, logprobs=zeros, ref_logprobs=zeros, advantages=zeros,
                                            scores=zeros[:, 0])
        with torch.no_grad():
            trained = module.response_logprobs(module.model, trajectory)[0]
        diff = (sample.sampled_logprobs - trained).abs()[sample.response_mask.bool()]
        assert diff.max() < 1e-5, (name, diff.max())  # 0.06 with the penalty applied by generate()
        sampled[name] = sample.response
    assert torch.equal(sampled["plain"], sampled["penalised"])  # the same draws: the penalty was not applied
    assert "repetition_penalty" in caplog.text and "no_repeat_ngram_size" in caplog.text


# -- 3. no dropout in the ratio --------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_first_minibatch_ratio_is_one_under_lora_dropout(make_cfg, monkeypatch, stage):
    import llm_stages.losses.rl as rl_losses
    import llm_stages.stages.ppo as ppo

    # A random model's replies hold a digit about half the time: rewards that vary within groups.
    digit = "+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, _partial_: true, pattern: '.*[0-9].*'}}"
    overrides = {"ppo": PPO, "grpo": [*GRPO, digit]}[stage]
    cfg = make_cfg(*overrides, "peft=lora", "peft.dropout=0.05", "trainer.max_steps=4", "optim.lr=1e-2")
    module, datamodule = build(cfg)
    assert module.model.peft_config["default"].lora_dropout == 0.05
    with torch.no_grad():  # a trained adapter: LoRA's B starts at 0, where dropout has no effect
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ratios = []
    owner, original = (ppo, ppo.clipped_policy_loss) if stage == "ppo" else (rl_losses, rl_losses.clipped_policy_loss)

    def recording(logprobs, old_logprobs, *args):
        ratios.append(torch.exp(logprobs - old_logprobs).detach())
        return original(logprobs, old_logprobs, *args)

    monkeypatch.setattr(owner, "clipped_policy_loss", recording)
    _fit(module, datamodule, cfg, [])
    assert module.ppo_epochs == 2 and len(ratios) >= 2
    first = ratios[0]
    torch.testing.assert_close(first, torch.ones_like(first), atol=1e-6, rtol=0)  # [0.82, 1.11] with dropout on
    assert any((r - 1).abs().max() > 1e-4 for r in ratios[1:])  # later minibatches follow the updates


# -- 7. DPO's and KTO's cached reference ---------------------------------------------------------
def _swap_replies(record: dict) -> None:
    record["chosen"], record["rejected"] = record["rejected"], record["chosen"]


def _flip_label(record: dict) -> None:
    record["label"] = not record["label"]


@pytest.mark.parametrize("stage,files,change", [("dpo", "pref", _swap_replies), ("kto", "unpaired", _flip_label)])
def test_precomputed_reference_resumes_and_is_refused_on_changed_data(make_cfg, tmp_path, demo_dir, stage, files, change):
    data = tmp_path / "data"
    data.mkdir()
    for name in (f"{files}_train.jsonl", f"{files}_val.jsonl"):
        shutil.copy(demo_dir / name, data / name)
    common = [f"stage={stage}", f"data.path={data}/{files}_train.jsonl", "data.cache_dir=null", "callbacks=default",
              "validate_before_fit=false", "trainer.limit_val_batches=1", "export.enabled=false"]
    run = tmp_path / "run"
    train(make_cfg(*common, "trainer.max_steps=2", output_dir=run))
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert len(torch.load(checkpoint, weights_only=False)["reference_fingerprint"]) == 16
    assert train(make_cfg(*common, "trainer.max_steps=3", f"ckpt_path={checkpoint}", output_dir=run))["steps"] == 3

    lines = (data / f"{files}_train.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    change(record)
    (data / f"{files}_train.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match="cached reference log-probs .* belong to other data or tokenization"):
        train(make_cfg(*common, "trainer.max_steps=4", f"ckpt_path={checkpoint}", output_dir=run))
