"""Every config mistake is one line naming the key, the value and what is allowed (or the fix), found
before any model or data is loaded; through the CLI: that line, exit status 2, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from llm_stages.errors import ConfigError
from llm_stages.models import explain_load_errors
from llm_stages.train import train
from tests.conftest import REPO

QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
OFFLINE = (f"model.hub_id={QWEN} cannot be loaded: it is not in the local Hugging Face cache and downloads are off "
           f"(HF_HUB_OFFLINE=1). Download it where there is network (`hf download {QWEN}`; then unset HF_HUB_OFFLINE, "
           "or copy the cache), or point model.path=<local copy>")

# (overrides, the one line); {dir} is a model directory made by the `model_dirs` fixture for that row.
CASES = {
    "max_steps_not_a_number": (["trainer.max_steps=abc"],
                               "trainer.max_steps=abc: expected an integer >= 1, or -1 (no limit: trainer.max_epochs)"),
    "negative_lr": (["optim.lr=-0.001"], "optim.lr=-0.001: expected a number > 0, e.g. 1e-5"),
    "unknown_dtype": (["model.dtype=float17"], "model.dtype=float17: expected one of float32, bfloat16, float16"),
    "zero_batch_size": (["datamodule.batch_size=0"], "datamodule.batch_size=0: expected an integer >= 1"),
    "unknown_scheduler": (["optim.scheduler=cosin"], "optim.scheduler=cosin: expected one of cosine, linear, constant"),
    "unknown_resume": (["resume=yes"], "resume=yes: expected auto or null"),
    "file_without_path": (["data=file"], "data.path is not set (data=file reads your own file); pass "
                          "data.path=<file or directory>, or data.sources=[{{path: ..., weight: ...}}]"),
    "local_without_path": (["model=local"], "model.path is not set (model=local loads a local checkpoint); pass "
                           "model.path=<directory of a Hugging Face checkpoint, e.g. an export>"),
    "missing_dir": (["model.path={dir}"], "model.path={dir}: no such directory"),
    "not_a_model": (["model.path={dir}"], "model.path={dir} is not a Hugging Face checkpoint directory (no config.json)"),
    "broken_config_json": (["model.path={dir}"], "model.path={dir}: config.json is not valid JSON (Expecting property "
                           "name enclosed in double quotes: line 1 column 2 (char 1)); re-export the model or repair the file"),
    "no_weights": (["model.path={dir}"], "model.path={dir} has no weights (model.safetensors or pytorch_model.bin); "
                   "was its export interrupted? Re-export it"),
    "no_tokenizer": (["model.path={dir}"], "model.path={dir} has weights but no tokenizer (tokenizer.json, "
                     "tokenizer.model, vocab.json); set model.tokenizer=<directory or hub id of its tokenizer>, or "
                     "export the model with its tokenizer"),
    "reward_model_missing": (["stage=ppo", "rollout.reward_model.path={dir}"],
                             "rollout.reward_model.path={dir}: no such directory"),
    "hub_model_offline": (["model=qwen"], OFFLINE),
    "loss_unknown_key": (["stage=dpo", "loss=simpo", "+loss.gama=1.0"],
                         "loss.gama is not a parameter of loss=simpo; its parameters: beta, gamma, label_smoothing"),
    "loss_not_a_number": (["stage=dpo", "loss=ipo", "loss.beta=abc"], "loss.beta=abc: expected a number"),
    "loss_without_dpo": (["loss=ipo"], "loss=ipo selects a preference loss, which stage=sft does not take: only "
                         "stage=dpo does (drop loss=, or put it in the DPO stage's overrides)"),
    "unknown_advantage": (["stage=grpo", "module.advantage=ppo"],
                          "module.advantage=ppo: expected one of grpo, rloo, reinforce_pp, reinforce_pp_baseline"),
    "kl_twice": (["stage=grpo", "module.advantage=reinforce_pp", "module.kl_coef=0.01", "module.beta=0.04"],
                 "module.beta=0.04 and module.kl_coef=0.01 would both penalise the KL to the reference: set module.beta=0 "
                 "(reinforce_pp keeps the KL in the reward)"),
    "kl_coef_with_grpo": (["stage=grpo", "module.kl_coef=0.01"], "module.kl_coef=0.01 puts the KL into the reward of "
                          "reinforce_pp and reinforce_pp_baseline only; with module.advantage=grpo use module.beta (the KL loss term)"),
    "overlong_buffer_too_long": (["stage=grpo", "rollout.overlong_buffer=100"], "rollout.overlong_buffer=100: expected an "
                                 "integer in [1, rollout.generation.max_new_tokens=64] (tokens before the limit where the "
                                 "penalty starts), or null (off)"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A directory per model-path case: a good checkpoint, broken in one way each."""
    root = tmp_path_factory.mktemp("models")
    good = root / "good"
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(good)
    tokenizer.save_pretrained(good)
    dirs = {name: root / name for name in ("missing_dir", "not_a_model", "broken_config_json", "no_weights", "no_tokenizer",
                                           "reward_model_missing")}
    (dirs["not_a_model"]).mkdir()
    (dirs["not_a_model"] / "notes.txt").write_text("not a model")
    for name, drop in (("broken_config_json", []), ("no_weights", ["model.safetensors"]),
                       ("no_tokenizer", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])):
        shutil.copytree(good, dirs[name])
        for file in drop:
            (dirs[name] / file).unlink()
    (dirs["broken_config_json"] / "config.json").write_text("{'model_type': 'qwen2'}")  # single quotes: not JSON
    return {"good": good, **dirs}


@pytest.mark.parametrize("case", CASES)
def test_a_config_mistake_is_one_line_before_anything_loads(case, make_cfg, model_dirs, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as this offline machine is
    monkeypatch.setattr("llm_stages.train.build", lambda cfg: pytest.fail("a model or data was loaded first"))
    overrides, line = CASES[case]
    directory = str(model_dirs.get(case, ""))
    cfg = make_cfg(*[o.format(dir=directory) for o in overrides])
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value) == line.format(dir=directory)


def test_a_good_model_dir_passes_the_checks(make_cfg, model_dirs):
    from llm_stages.checks import check_config

    check_config(make_cfg(f"model.path={model_dirs['good']}"))


@pytest.mark.parametrize("raised, line", [
    (OSError(f"{QWEN} is a gated repository. Make sure to request access at https://huggingface.co/{QWEN} and pass a "
             "token having permission to this repo either by logging in with `hf auth login`."),
     f"model.hub_id={QWEN} is gated: request access at https://huggingface.co/{QWEN}, then log in (`hf auth login` or "
     "HF_TOKEN=...), or point model.path=<local copy>"),
    (OSError(f"{QWEN} is not a local folder or a valid repository name on 'https://hf.co'."),
     f"model.hub_id={QWEN}: no such model on the Hugging Face hub and no such local directory (a private one needs "
     "`hf auth login`); check the id, or point model.path=<local copy>"),
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached "
             "files.\nCheck your internet connection."),
     f"model.hub_id={QWEN} cannot be loaded: it is not in the local Hugging Face cache and the hub cannot be reached "
     "(We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.). "
     f"Download it where there is network (`hf download {QWEN}`; then unset HF_HUB_OFFLINE, or copy the cache), or "
     "point model.path=<local copy>"),
])
def test_hub_load_failures_are_one_line_with_the_fix(raised, line):
    with pytest.raises(ConfigError) as error, explain_load_errors("model.hub_id", QWEN):
        raise raised
    assert str(error.value) == line


@pytest.mark.slow
@pytest.mark.parametrize("overrides, line", [
    (["model=qwen"], OFFLINE),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc: expected an integer >= 1, or -1 (no limit: trainer.max_epochs)"),
])
def test_cli_prints_the_line_and_no_traceback(tmp_path, overrides, line):
    run = subprocess.run([sys.executable, "-m", "llm_stages", "logger=none", *overrides], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert [l for l in run.stderr.splitlines() if l.startswith("error:")] == [f"error: {line}"]
    assert "Traceback" not in run.stdout + run.stderr
