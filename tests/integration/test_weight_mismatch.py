"""A checkpoint whose weights do not match its config (renamed tensors, another shape, another
architecture) is one ConfigError naming the weights, not a run on randomly initialised ones; the
expected differences (a fresh reward head on a causal LM export, a tied lm_head) still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from llm_stages.errors import ConfigError
from llm_stages.train import train

TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.0.mlp.up_proj.weight"


def _edit_weights(directory: Path, edit) -> None:
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A good causal LM export (tied embeddings, as the tiny model) and copies broken one way each."""
    root = tmp_path_factory.mktemp("exports")
    good = root / "good"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, **TINY)).save_pretrained(good)
    tokenizer.save_pretrained(good)
    untied = root / "untied"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, **TINY)).save_pretrained(untied)
    tokenizer.save_pretrained(untied)
    dirs = {"good": good, "untied": untied}
    for name in ("renamed", "reshaped", "no_lm_head"):
        dirs[name] = root / name
        shutil.copytree(untied if name == "no_lm_head" else good, dirs[name])
    _edit_weights(dirs["renamed"], lambda w: w.__setitem__("model.layers.0.self_attn.query.weight", w.pop(Q_PROJ)))
    _edit_weights(dirs["reshaped"], lambda w: w.__setitem__(UP_PROJ, torch.zeros(16, 16)))
    _edit_weights(dirs["no_lm_head"], lambda w: w.pop("lm_head.weight"))
    return dirs


FIX = ("the checkpoint does not match the config (a renamed export or another architecture?). To load it partially on "
       "purpose: model.allow_partial_load=true")


@pytest.mark.parametrize("case, what", [
    ("renamed", f"1 weight missing from the checkpoint ({Q_PROJ}) and 1 unexpected (model.layers.0.self_attn.query.weight)"),
    ("reshaped", f"1 weight of another shape ({UP_PROJ}: checkpoint [16, 16], model [32, 16])"),
    ("no_lm_head", "1 weight missing from the checkpoint (lm_head.weight)"),
])
def test_a_checkpoint_that_does_not_match_is_one_line(case, what, exports, make_cfg):
    cfg = make_cfg("model=local", f"model.path={exports[case]}", "trainer.max_steps=1")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == f"model.path={exports[case]}: {what}; {FIX}"


def test_allow_partial_load_loads_what_matches(exports, make_cfg, tokenizer, caplog):
    from llm_stages.models import load_model

    cfg = make_cfg("model=local", f"model.path={exports['renamed']}", "model.allow_partial_load=true")
    good = load_model(make_cfg("model=local", f"model.path={exports['good']}").model, tokenizer)
    partial = load_model(cfg.model, tokenizer)
    assert torch.equal(partial.model.layers[0].self_attn.k_proj.weight, good.model.layers[0].self_attn.k_proj.weight)
    assert not torch.equal(partial.model.layers[0].self_attn.q_proj.weight, good.model.layers[0].self_attn.q_proj.weight)
    assert f"1 weight missing from the checkpoint ({Q_PROJ})" in caplog.text


@pytest.mark.parametrize("export", ["good", "untied"])
def test_a_reward_model_from_a_causal_lm_export_still_loads(export, exports, make_cfg):
    """stage=rm on an SFT export: the score head starts fresh (an untied lm_head is dropped); the backbone is the export's."""
    cfg = make_cfg("stage=rm", "model=local", f"model.path={exports[export]}", "trainer.max_steps=1",
                   "datamodule.batch_size=2", "datamodule.val_batch_size=2", "trainer.limit_val_batches=1",
                   "export.enabled=false", "validate_before_fit=false")
    metrics = train(cfg)
    assert metrics["steps"] == 1


def test_a_reward_model_for_scoring_needs_its_trained_head(exports, tokenizer):
    """The RL stages' reward model scores with the export's head: an SFT export there would score randomly."""
    from omegaconf import OmegaConf

    from llm_stages.rollout.rollout import load_reward_model

    cfg = OmegaConf.create({"name": "reward_model", "path": str(exports["good"]), "dtype": "float32"})
    with pytest.raises(ConfigError) as error:
        load_reward_model(cfg, tokenizer)
    assert str(error.value) == (f"rollout.reward_model.path={exports['good']}: 1 weight missing from the checkpoint "
                                "(score.weight); the checkpoint does not match the config (a renamed export or another "
                                "architecture?). To load it partially on purpose: +rollout.reward_model.allow_partial_load=true")
