"""A config mistake on the command line is one `error:` line naming the override as typed and what is
allowed (a group's options, the closest keys, the syntax), exit status 2, answered from the composed
config alone: torch, Lightning and transformers are not imported for it. A GPU asked for on a
machine without one is refused by the config checks, before a model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llm_stages.__main__ import check_command_line, cli
from llm_stages.checks import check_config
from llm_stages.config import compose
from llm_stages.errors import ConfigError
from tests.conftest import REPO

LOSSES = ("aot, aot_pair, aot_unpaired, apo_down, apo_zero, bco_pair, discopop, exo_pair, hinge, ipo, nca_pair, orpo, "
          "robust, sigmoid, sigmoid_norm, simpo, sppo_hard")
SYNTAX = "write key=value; +key=value adds a key, ~key deletes one; quote a value with spaces or brackets: key='a b'"

MISTAKES = {
    "unknown_stage": (["stage=nope"],
                      "stage=nope: no such option; stage options: distill, dpo, eval, generate, grpo, kto, ppo, pt, rm, sft "
                      "(conf/stage/*.yaml)"),
    "unknown_loss": (["stage=dpo", "loss=nonexistent"],
                     f"loss=nonexistent: no such option; loss options: {LOSSES} (conf/loss/*.yaml)"),
    # `_base` (a building block the options extend) is not an option to pick
    "unknown_model": (["model=nope"],
                      "model=nope: no such option; model options: local, qwen, qwen_0_5b_init, smollm2, tiny "
                      "(conf/model/*.yaml)"),
    "unknown_key": (["foo=1"], "foo=1: no such key in the config (to add a new key: +foo=1)"),
    "misspelt_key": (["trainer.max_step=3"], "trainer.max_step=3: no such key in the config; did you mean "
                                             "trainer.max_steps? (to add a new key: +trainer.max_step=3)"),
    "key_in_the_wrong_place": (["max_steps=3"], "max_steps=3: no such key in the config; did you mean "
                                                "trainer.max_steps? (to add a new key: +max_steps=3)"),
    "misspelt_loss_parameter": (["stage=dpo", "loss=ipo", "loss.bta=0.2"],
                                "loss.bta=0.2: no such key in the config; did you mean loss.beta? "
                                "(to add a new key: +loss.bta=0.2)"),
    "unparsable": (["trainer.max_steps=[1"],
                   f"trainer.max_steps=[1: not a valid override (no viable alternative at input '[1'); {SYNTAX}"),
    "added_twice": (["+trainer.max_steps=1"],
                    "+trainer.max_steps=1: trainer.max_steps is already in the config; set it without the +: "
                    "trainer.max_steps=1"),
    "deleting_nothing": (["~foo"], "~foo: no such key in the config, nothing to delete"),
    "sweep_without_m": (["optim.lr=1e-5,1e-4"],
                        "optim.lr=1e-5,1e-4: a comma-separated value is a sweep, which needs -m (--multirun); "
                        "for a list write optim.lr=[1e-5,1e-4], for a string quote it: optim.lr='1e-5,1e-4'"),
    "swept_option_unknown": (["-m", "stage=dpo", "loss=ipo,nope"],
                             f"loss=nope (in loss=ipo,nope): no such option; loss options: {LOSSES} (conf/loss/*.yaml)"),
    "swept_key_unknown": (["-m", "optim.lrr=1e-5,1e-4"],
                          "optim.lrr=1e-5,1e-4: no such key in the config; did you mean optim.lr? "
                          "(to add a new key: +optim.lrr=1e-5,1e-4)"),
    "group_set_to_null": (["peft=null"], "peft=null: a config group is not set to null on the command line; to leave "
                                         "it out, delete it: ~peft"),
    "misspelt_command": (["generat"], "generat: neither a command (first word: generate, eval, chat) nor an "
                                      "override (key=value)"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_naming_the_override(case):
    args, line = MISTAKES[case]
    with pytest.raises(ConfigError) as error:
        check_command_line(args)
    assert str(error.value) == line


@pytest.mark.parametrize("args", [
    ["stage=dpo", "loss=ipo", "loss.beta=0.2", "+wandb.tags=[a]", "~export"],
    ["-m", "stage=dpo", "loss=ipo,sigmoid", "optim.lr=1e-5,1e-4", "datamodule.batch_size=range(2,6,2)"],
    ["hparams_search=optuna", "stage=dpo", "optim.lr=interval(1e-6,1e-4)"],  # the Optuna config sets MULTIRUN
    ["--cfg", "job", "stage=pt", "hydra.run.dir=/tmp/run", "hydra.job.chdir=false"],
    ["stage=pt", "~data"],  # a config group left out
    ["--hydra-help"],  # Hydra's own pages are left to Hydra
])
def test_what_hydra_runs_passes_the_check(args):
    check_command_line(args)


def test_the_cli_prints_the_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["llm_stages", "stage=nope"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {MISTAKES['unknown_stage'][1]}\n"


def test_chat_overrides_are_checked_against_the_chat_config(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["llm_stages", "chat", "generation.temprature=0.2"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: generation.temprature=0.2: no such key in the config; did you mean "
                                       "generation.temperature? (to add a new key: +generation.temprature=0.2)\n")


def test_help_lists_the_groups_and_the_composed_config(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["llm_stages", "-m", "stage=dpo", "--help"])
    cli()
    out = capsys.readouterr().out
    assert f"  loss: {LOSSES}\n" in out and "  stage: distill, dpo, eval, generate, grpo, kto, ppo, pt, rm, sft\n" in out
    assert "== Config with stage=dpo " in out and "\n  name: dpo\n" in out


# Through a real process: the line on stderr, status 2, and none of the heavy libraries imported.
HEAVY = ("torch", "lightning", "transformers")
PROBE = """
import sys
from llm_stages.__main__ import cli
sys.argv = ["llm_stages", *sys.argv[1:]]
try:
    cli()
except SystemExit as e:
    print("exit", e.code, *sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args, case", [(["stage=nope"], "unknown_stage"), (["foo=1"], "unknown_key"),
                                        (["chat", "model=nope"], None)])
def test_the_cli_process_answers_without_importing_torch(args, case):
    run = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.stdout.strip() == "exit 2"  # no heavy module listed after the code
    line = MISTAKES[case][1] if case else ("model=nope: no such option; model options: local, qwen, qwen_0_5b_init, "
                                           "smollm2, tiny (conf/model/*.yaml)")
    assert run.stderr == f"error: {line}\n"


def test_python_m_llm_stages_prints_one_line_and_exits_2():
    run = subprocess.run([sys.executable, "-m", "llm_stages", "loss=nonexistent"], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (run.returncode, run.stdout, run.stderr) == (2, "", f"error: {MISTAKES['unknown_loss'][1]}\n")


@pytest.mark.parametrize("overrides, visible, line", [
    (["trainer=gpu"], 0,
     "trainer=gpu needs a CUDA GPU; none is visible (torch.cuda.is_available() is False); use trainer=cpu"),
    (["trainer=ddp", "trainer.accelerator=cuda"], 0,
     "trainer.accelerator=cuda needs a CUDA GPU; none is visible (torch.cuda.is_available() is False); use trainer=cpu"),
    (["trainer=gpu", "trainer.devices=2"], 1, "trainer.devices=2: 1 CUDA GPU(s) visible; use trainer.devices=1 or fewer"),
    (["trainer=gpu", "trainer.devices=[0,1,2]"], 2,
     "trainer.devices=[0, 1, 2]: 2 CUDA GPU(s) visible; use trainer.devices=2 or fewer"),
])
def test_a_gpu_asked_for_is_checked_before_loading(overrides, visible, line, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    with pytest.raises(ConfigError) as error:
        check_config(compose(overrides))
    assert str(error.value) == line


@pytest.mark.parametrize("overrides, visible", [(["trainer=gpu"], 1), (["trainer=fsdp"], 2), (["trainer=ddp"], 0)])
def test_enough_gpus_or_none_asked_for_pass(overrides, visible, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    check_config(compose(overrides))


def test_chat_device_cuda_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"^device=cuda needs a CUDA GPU; none is visible .* use device=cpu$"):
        check_config(compose(["device=cuda"], config_name="chat"))
