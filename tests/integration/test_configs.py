"""Every stage x model x data config composes; the CLI prints the composed config."""

from __future__ import annotations

import sys

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from llm_stages.config import CONFIG_DIR

STAGES = sorted(p.stem for p in (CONFIG_DIR / "stage").glob("*.yaml"))
COMMANDS = ["eval", "generate"]  # stage configs that train nothing (llm_stages/evaluate/run.py)
TRAINING_STAGES = [s for s in STAGES if s not in COMMANDS]
SUITES = sorted(p.stem for p in (CONFIG_DIR / "eval").glob("[!_]*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("[!_]*.yaml") if p.stem != "local")  # _base: no model
DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml") if p.stem != "file")
TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("[!_]*.yaml"))


@pytest.mark.parametrize("stage", TRAINING_STAGES)
@pytest.mark.parametrize("model", MODELS)
def test_stage_x_model_composes_and_resolves(stage, model, make_cfg):
    cfg = make_cfg(f"stage={stage}", f"model={model}", quiet=False)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.stage.name == stage and cfg.model.name == model
    assert cfg.module._target_.startswith("llm_stages.stages.")
    optim = instantiate(cfg.optim)
    assert optim.lr > 0


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes_and_builds_its_strategy(trainer, make_cfg):
    """The fast check (make test): each trainer config once; the whole stage grid is the slow test below."""
    cfg = make_cfg("stage=sft", f"trainer={trainer}", quiet=False)
    OmegaConf.resolve(cfg)
    strategy = cfg.trainer.get("strategy")
    if strategy is not None:
        assert get_class(strategy._target_)
        if "deepspeed" not in trainer:
            assert instantiate(strategy) is not None


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes_with_every_stage(trainer, make_cfg):
    """Every trainer config (cpu, gpu, ddp, fsdp, fsdp2, deepspeed) composes and resolves with
    every stage; its strategy is built too, except DeepSpeed's, which needs the optional, CUDA-only
    deepspeed package (there: the class must exist)."""
    for stage in STAGES:
        cfg = make_cfg(f"stage={stage}", f"trainer={trainer}", quiet=False)
        OmegaConf.resolve(cfg)
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    strategy = cfg.trainer.get("strategy")
    if strategy is not None:
        assert get_class(strategy._target_)
        if "deepspeed" not in trainer:
            assert instantiate(strategy) is not None


@pytest.mark.parametrize("suite", SUITES)
def test_every_eval_suite_composes_with_known_task_types_and_data(suite, make_cfg):
    from llm_stages.evaluate.run import TASK_TYPES

    assert "demo" in SUITES and sorted(COMMANDS) == sorted(set(STAGES) - set(TRAINING_STAGES))
    cfg = make_cfg("stage=eval", f"eval={suite}", "model=local", "model.path=runs/x/export")
    OmegaConf.resolve(cfg)
    assert cfg.stage.name == "eval" and cfg.eval.name == suite and cfg.eval.tasks
    for name, task in cfg.eval.tasks.items():
        assert task.type in TASK_TYPES and task.data.path, name
    for key in cfg.eval.get("summary") or []:
        assert key.split("/")[0] in cfg.eval.tasks, key
    generate = make_cfg("stage=generate", "data.path=prompts.jsonl")
    assert generate.stage.name == "generate" and generate.generate.generation.do_sample is False


def test_every_preference_loss_has_a_config_with_its_declared_parameters(make_cfg):
    """conf/loss/<name>.yaml for every loss the DPO stage can run, composing with stage=dpo into
    module.loss with exactly the parameters (and defaults) its function declares."""
    from llm_stages.losses.preference import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, loss_parameters, loss_settings

    names = sorted([*PREFERENCE_LOSSES, *REFERENCE_FREE_LOSSES])
    assert sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")) == names
    for name in names:
        module = OmegaConf.to_container(make_cfg("stage=dpo", f"loss={name}").module, resolve=True)
        assert module["loss"] == {"name": name, **loss_parameters(name)}
        assert loss_settings(module["loss"]) == (name, loss_parameters(name))
    assert make_cfg("stage=dpo").module.loss == {"name": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
    assert make_cfg("stage=dpo", "loss=simpo").module.loss.beta == 2.0  # SimPO's own, not DPO's 0.1
    assert make_cfg("stage=dpo", "loss=ipo", "loss.beta=0.5").module.loss == {"name": "ipo", "beta": 0.5}


@pytest.mark.parametrize("data", DATA)
def test_every_data_config_composes(data, make_cfg):
    """The fast check (make test): each data config once; the whole stage grid is the slow test below."""
    cfg = make_cfg("stage=sft", f"data={data}")
    assert cfg.data.name == data and cfg.data.path


@pytest.mark.slow
@pytest.mark.parametrize("data", DATA)
def test_every_data_config_composes_with_every_stage(data, make_cfg):
    for stage in STAGES:
        cfg = make_cfg(f"stage={stage}", f"data={data}")
        assert cfg.data.name == data and cfg.data.path


def test_groups_the_issue_names_exist():
    for group in ["stage", "model", "data", "trainer", "logger", "callbacks", "optim", "experiment", "paths", "hydra"]:
        assert (CONFIG_DIR / group).is_dir(), group
    for name in ["stage/pt", "stage/sft", "model/tiny", "model/smollm2", "model/qwen", "trainer/cpu", "trainer/gpu",
                 "trainer/ddp", "logger/wandb", "logger/csv", "logger/none"]:
        assert (CONFIG_DIR / f"{name}.yaml").is_file(), name


def test_trainer_and_logger_configs_instantiate(make_cfg, tmp_path):
    for logger in ["csv", "wandb"]:
        cfg = make_cfg(f"logger={logger}", quiet=False)
        [lg] = [instantiate(c) for c in cfg.logger.values()]
        assert lg is not None
    cfg = make_cfg("trainer=cpu")
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_cli_cfg_job_prints_composed_config(tmp_path, monkeypatch, capsys):
    from llm_stages.__main__ import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["llm_stages", "stage=pt", "model=qwen", "optim.lr=0.123", "--cfg", "job"])
    cli()  # Hydra prints the config and returns without running the job
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.optim.lr == 0.123 and cfg.model.hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.datamodule._target_ == "llm_stages.data.datamodule.PTDataModule"


def test_qwen_0_5b_init_builds_qwen2_5_0_5b_s_architecture_from_config(make_cfg, tokenizer):
    """model=qwen_0_5b_init: Qwen2.5-0.5B's shapes (494,032,768 parameters, its padded vocabulary) from
    config alone, no hub; built on the meta device here so the test allocates nothing."""
    import torch

    from llm_stages.models import load_model

    cfg = make_cfg("model=qwen_0_5b_init")
    with torch.device("meta"):
        model = load_model(cfg.model, tokenizer)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert model.get_input_embeddings().num_embeddings == 151_936 > len(tokenizer)
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 24


def test_a_fresh_models_vocabulary_may_be_padded_but_never_smaller_than_the_tokenizer(make_cfg, tokenizer):
    from llm_stages.errors import ConfigError
    from llm_stages.models import load_model

    model = load_model(make_cfg("+model.init.vocab_size=1280").model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == 1280 > len(tokenizer)
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        load_model(make_cfg(f"+model.init.vocab_size={len(tokenizer) - 1}").model, tokenizer)
