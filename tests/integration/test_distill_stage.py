"""stage=distill on the tiny model: the loss equals TRL's GKD loss on the same batch, the teacher is
frozen and never saved, on-policy micro-batches train only the student's sampled replies, and a
teacher with another vocabulary is refused in one line before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.data.collate import collate_causal
from llm_stages.errors import ConfigError
from llm_stages.models import load_model, load_tokenizer
from llm_stages.stages.distill import prompt_batch, sampled_batch
from llm_stages.train import build, train

TEACHER_INIT = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A (randomly initialised) teacher of another size than the student, saved as an HF checkpoint."""
    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    torch.manual_seed(3)
    model = load_model(OmegaConf.create({"name": "teacher", "init": TEACHER_INIT}), tokenizer)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cfg(make_cfg, teacher_dir, *overrides):
    return make_cfg("stage=distill", f"module.teacher.path={teacher_dir}", "datamodule.batch_size=4",
                    "datamodule.val_batch_size=8", *overrides)


def test_loss_equals_trls_gkd_loss_on_the_same_batch(make_cfg, teacher_dir):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    module, datamodule = build(_cfg(make_cfg, teacher_dir, "module.beta=0.3", "module.temperature=0.9",
                                    "module.chunk_size=7"))
    datamodule.setup("fit")
    batch = collate_causal([datamodule.train_set[i] for i in range(4)], datamodule.tokenizer.pad_token_id)
    loss_sum, stats = module.loss_sum(batch)
    ours = loss_sum / module.loss_weight(batch)

    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    student, teacher = module.model(**inputs).logits, module.teacher(**inputs).logits
    trl = GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels=batch.labels[:, 1:], beta=0.3,
                                          temperature=0.9)
    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-5)
    trained = batch.labels[:, 1:] != -100
    agree = (student[:, :-1].argmax(-1) == teacher[:, :-1].argmax(-1))[trained].sum()
    assert int(stats["teacher_agreement"]) == int(agree)


def test_sampled_batch_trains_only_the_reply(make_cfg, teacher_dir):
    module, datamodule = build(_cfg(make_cfg, teacher_dir, "module.lmbda=1.0", "module.generation.max_new_tokens=5"))
    datamodule.setup("fit")
    batch = collate_causal([datamodule.train_set[i] for i in range(3)], datamodule.tokenizer.pad_token_id)
    prompts = prompt_batch(batch, datamodule.tokenizer.pad_token_id)
    for row in range(3):  # each prompt is the row's tokens before its first trained one, left-padded
        first = int((batch.labels[row] != -100).int().argmax())
        n = int(prompts.attention_mask[row].sum())
        assert n == first and torch.equal(prompts.input_ids[row, -n:], batch.input_ids[row, :first])
    sample = module.sampler.sample(module.model, prompts, generation=module.sampler.generation, seed=0)
    sampled = sampled_batch(sample)
    width = prompts.input_ids.shape[1]
    assert (sampled.labels[:, :width] == -100).all()
    reply_labels = sampled.labels[:, width:]
    assert torch.equal(reply_labels != -100, sample.response_mask.bool())
    assert torch.equal(reply_labels[sample.response_mask.bool()], sample.response[sample.response_mask.bool()])


@pytest.mark.slow
def test_trains_on_and_off_policy_and_never_saves_the_teacher(make_cfg, teacher_dir, tmp_path):
    cfg = _cfg(make_cfg, teacher_dir, "module.lmbda=0.5", "module.generation.max_new_tokens=6", "trainer.max_steps=4",
               "datamodule.grad_accum=2", "optim.lr=5e-3", "validate_before_fit=true", "trainer.val_check_interval=4",
               "callbacks=default", "callbacks.generation_samples=null")
    metrics = train(cfg)
    assert metrics["steps"] == 4
    assert metrics["val/loss"] < metrics["val/loss_before"]
    assert 0 <= metrics["val/teacher_agreement"] <= 1
    export = Path(metrics["export_dir"])
    assert not any("teacher" in name for name in _safetensor_names(export))
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])


def _safetensor_names(export: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in export.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names += list(f.keys())
    return names


def test_a_teacher_with_another_vocabulary_is_refused_in_one_line(make_cfg, teacher_dir, tmp_path):
    other = tmp_path / "other_teacher"
    tokenizer = load_tokenizer(OmegaConf.create({"path": str(teacher_dir)}))
    vocab = tokenizer.get_vocab()
    # Swap two ids: same size, different meaning of shared ids.
    (a, ia), (b, ib) = sorted(vocab.items(), key=lambda kv: kv[1])[100:102]
    import json
    import shutil

    shutil.copytree(teacher_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    model_vocab = data["model"]["vocab"]
    model_vocab[a], model_vocab[b] = ib, ia
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"vocabulary of \d+ tokens and the student \d+"):
        build(_cfg(make_cfg, other))


def test_missing_teacher_path_is_one_line(make_cfg):
    from llm_stages.checks import check_config

    with pytest.raises(ConfigError, match="module.teacher.path is not set"):
        check_config(make_cfg("stage=distill"))


@pytest.mark.parametrize("override,message", [
    ("module.beta=1.5", r"module.beta=1.5: expected a number in \[0, 1\]"),
    ("module.temperature=0", r"module.temperature=0: expected a number > 0"),
    ("module.lmbda=-0.1", r"module.lmbda=-0.1: expected a number in \[0, 1\]"),
    ("module.chunk_size=0", r"module.chunk_size=0: expected an integer >= 1"),
])
def test_out_of_range_settings_are_one_line_before_any_model_loads(make_cfg, teacher_dir, override, message):
    from llm_stages.checks import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(_cfg(make_cfg, teacher_dir, override))


def test_a_negative_distillation_reward_is_refused_with_the_config(make_cfg, teacher_dir):
    from llm_stages.checks import check_config

    with pytest.raises(ConfigError, match=r"module.distill_coef=-1: expected a number >= 0"):
        check_config(make_cfg("stage=grpo", f"module.teacher.path={teacher_dir}", "module.distill_coef=-1"))
