"""Typed settings outside their declared range (llm_stages.ranges: each loss's hyperparameters, the RL
and KTO module settings, the sampling settings) are one ConfigError naming key, value and range,
found by check_config before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llm_stages.checks import check_config
from llm_stages.errors import ConfigError
from llm_stages.ranges import Range
from tests.conftest import REPO

CASES = {
    "dpo_negative_beta": (["stage=dpo", "loss.beta=-1"], "loss.beta=-1: expected a number > 0"),
    "ipo_zero_beta": (["stage=dpo", "loss=ipo", "loss.beta=0"], "loss.beta=0: expected a number > 0"),
    "label_smoothing_half": (["stage=dpo", "loss.label_smoothing=0.5"],
                             "loss.label_smoothing=0.5: expected a number in [0, 0.5)"),
    "label_smoothing_negative": (["stage=dpo", "loss=robust", "loss.label_smoothing=-0.1"],
                                 "loss.label_smoothing=-0.1: expected a number in [0, 0.5)"),
    "exo_pair_without_smoothing": (["stage=dpo", "loss=exo_pair", "loss.label_smoothing=0"],
                                   "loss.label_smoothing=0: expected a number in (0, 0.5) (the EXO paper recommends 1e-3)"),
    "simpo_negative_margin": (["stage=dpo", "loss=simpo", "loss.gamma=-1"], "loss.gamma=-1: expected a number >= 0"),
    "discopop_zero_tau": (["stage=dpo", "loss=discopop", "loss.discopop_tau=0"],
                          "loss.discopop_tau=0: expected a number > 0"),
    "negative_rpo_alpha": (["stage=dpo", "module.rpo_alpha=-1"],
                           "module.rpo_alpha=-1: expected a number >= 0, or null (null: no NLL term)"),
    "negative_lr": (["stage=dpo", "optim.lr=-1e-5"], "optim.lr=-1e-05: expected a number > 0, e.g. 1e-5"),
    "top_p_zero": (["stage=grpo", "rollout.generation.top_p=0"],
                   "rollout.generation.top_p=0: expected a number in (0, 1], or null"),
    "negative_temperature": (["stage=ppo", "rollout.generation.temperature=-1"],
                             "rollout.generation.temperature=-1: expected a number > 0, or null (greedy: "
                             "rollout.generation.do_sample=false)"),
    "val_top_k_negative": (["stage=grpo", "+rollout.val_generation.top_k=-1"],
                           "rollout.val_generation.top_k=-1: expected an integer >= 0, or null (0: no top-k cut)"),
    "do_sample_not_bool": (["stage=grpo", "rollout.generation.do_sample=1"],
                           "rollout.generation.do_sample=1: expected true or false"),
    "ppo_zero_cliprange": (["stage=ppo", "module.cliprange=0"], "module.cliprange=0: expected a number > 0"),
    "ppo_negative_value_clip": (["stage=ppo", "module.cliprange_value=-0.2"],
                                "module.cliprange_value=-0.2: expected a number > 0"),
    "ppo_negative_kl_coef": (["stage=ppo", "module.kl_coef=-0.05"], "module.kl_coef=-0.05: expected a number >= 0"),
    "ppo_lambda_above_one": (["stage=ppo", "module.lam=1.5"], "module.lam=1.5: expected a number in [0, 1]"),
    "grpo_zero_epsilon": (["stage=grpo", "module.epsilon=0"], "module.epsilon=0: expected a number > 0"),
    "grpo_negative_epsilon_high": (["stage=grpo", "module.epsilon_high=-0.1"],
                                   "module.epsilon_high=-0.1: expected a number > 0, or null (null: = epsilon)"),
    "grpo_negative_beta": (["stage=grpo", "module.beta=-0.04"], "module.beta=-0.04: expected a number >= 0"),
    "grpo_one_generation": (["stage=grpo", "module.num_generations=1"], "module.num_generations=1: expected an integer "
                            ">= 2 (advantages compare the replies within a group)"),
    "kto_zero_weight": (["stage=kto", "module.desirable_weight=0"], "module.desirable_weight=0: expected a number > 0"),
    "kto_negative_beta": (["stage=kto", "module.beta=-0.1"], "module.beta=-0.1: expected a number > 0"),
    "generate_top_p_above_one": (["stage=generate", "data.path=prompts.jsonl", "generate.generation.top_p=1.5"],
                                 "generate.generation.top_p=1.5: expected a number in (0, 1], or null"),
    "chat_zero_temperature": (["--config-name=chat", "generation.temperature=0"],
                              "generation.temperature=0: expected a number > 0, or null (greedy: "
                              "generation.do_sample=false)"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_value_outside_its_range_is_one_line(case, make_cfg):
    overrides, line = CASES[case]
    if overrides[0] == "--config-name=chat":
        from llm_stages.config import compose

        cfg = compose(overrides[1:], config_name="chat")
    else:
        cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert str(error.value) == line


@pytest.mark.parametrize("stage", ["dpo", "kto", "ppo", "grpo", "generate"])
def test_the_shipped_defaults_are_in_range(stage, make_cfg, demo_dir):
    check_config(make_cfg(f"stage={stage}", *([f"data.path={demo_dir}/rl_train.jsonl"] if stage == "generate" else [])))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "exo_pair", "robust", "simpo", "orpo", "discopop", "bco_pair"])
def test_every_shipped_loss_config_is_in_range(loss, make_cfg):
    check_config(make_cfg("stage=dpo", f"loss={loss}"))


def test_range_bounds():
    half_open = Range(0, 0.5, high_open=True)
    assert [half_open.contains(v) for v in (0, 0.25, 0.5, -0.1, None, True, "0.1")] == [True, True, False, False,
                                                                                        False, False, False]
    assert Range(1, integer=True, nullable=True).contains(None) and not Range(1, integer=True).contains(1.5)


@pytest.mark.slow
def test_cli_negative_temperature_is_one_line_and_loads_no_model(tmp_path):
    run = subprocess.run([sys.executable, "-m", "llm_stages", "stage=grpo", "logger=none",
                          "rollout.generation.temperature=-1"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-2000:]
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
        "error: rollout.generation.temperature=-1: expected a number > 0, or null (greedy: "
        "rollout.generation.do_sample=false)"]
    assert "Traceback" not in output
    assert "parameters, dtype" not in output and "Loading weights" not in output  # load_model's log line: no model
