"""Sharded training on two CPU processes (gloo): FSDP2 (`trainer=fsdp2`) trains, writes sharded
checkpoints, resumes from them exactly, and exports a full HF checkpoint with the sharded model's
own logits; FSDP1 (`trainer=fsdp`) does the same with Lightning's CPU check bypassed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_stages.train import build
from tests.conftest import REPO, TEST_MODEL


SCRIPT = """
import json, os, pathlib, sys
import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from llm_stages.config import compose
from llm_stages.train import train

IDS = (torch.arange(24) * 7 % 1000).reshape(2, 12)  # fixed input for the logits

class Logits(L.Callback):
    # At the end of training, the sharded model's logits (every rank takes part in the forward).
    def on_train_end(self, trainer, pl_module):
        pl_module.model.eval()
        with torch.no_grad():
            logits = pl_module.model(input_ids=IDS.to(pl_module.device)).logits.float().cpu()
        pl_module.model.train()
        torch.save(logits, pathlib.Path(trainer.default_root_dir, f"logits_rank{trainer.global_rank}.pt"))

class StopAfter(L.Callback):  # a run cut short at a step, its schedule still the full run's
    def __init__(self, step):
        self.step = step
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True

class CPUFSDPStrategy(FSDPStrategy):
    # Lightning refuses FSDPStrategy on CPU (its check is on the exact class); torch's FSDP1 runs there.
    pass

out = sys.argv[1]
metrics = train(compose(sys.argv[2:], output_dir=out))
rank = os.environ.get("LOCAL_RANK", "0")  # one file per rank: two ranks printing to one pipe can interleave
plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
pathlib.Path(out, f"metrics_rank{rank}.json").write_text(json.dumps(plain))
"""

STEPS = 8
COMMON = ["stage=sft", *TEST_MODEL, "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.precision=32", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
          "datamodule.batch_size=2", "datamodule.grad_accum=2", "callbacks.periodic_checkpoint.every_n_train_steps=3",
          # every rank generates the samples and gathers the periodic export: both must stay in step
          "callbacks.generation_samples.every_n_steps=4", "callbacks.generation_samples.max_new_tokens=4",
          "callbacks.export_hf.every_n_steps=4", "+callbacks.logits._target_=__main__.Logits"]
FSDP1_ON_CPU = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                "trainer.strategy._target_=__main__.CPUFSDPStrategy"]


def _run(tmp_path: Path, demo_dir: Path, run_dir: Path, *overrides: str) -> dict:
    """The script on 2 ranks (Lightning starts the second); each rank's metrics as it wrote them."""
    script = tmp_path / "sharded_run.py"
    script.write_text(SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(run_dir), *COMMON, f"paths.data_dir={demo_dir.parent}",
                          f"paths.log_dir={tmp_path}/runs", *overrides], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    metrics = [json.loads((run_dir / f"metrics_rank{r}.json").read_text()) for r in (0, 1)]
    measured = {"fit_seconds", "perf/peak_rss_gb"}  # per process
    reduced = [{k: v for k, v in m.items() if k not in measured} for m in metrics]
    assert reduced[0] == reduced[1]  # the ranks agree on every reduced metric
    return metrics[0]


def _check_export_matches_sharded_logits(run_dir: Path) -> None:
    sharded = [torch.load(run_dir / f"logits_rank{r}.pt") for r in (0, 1)]
    assert torch.equal(sharded[0], sharded[1])
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    with torch.no_grad():
        logits = exported(input_ids=(torch.arange(24) * 7 % 1000).reshape(2, 12)).logits
    torch.testing.assert_close(logits, sharded[0], rtol=0, atol=1e-5)
    # Tied embeddings saved once, as an unsharded run saves them.
    assert "lm_head.weight" not in load_file(run_dir / "export" / "model.safetensors")


def _initial_weights(make_cfg) -> dict[str, torch.Tensor]:
    module, _ = build(make_cfg("stage=sft"))  # the seeded initial model the runs start from
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.slow
def test_fsdp2_sft_trains_checkpoints_resumes_exactly_and_exports(tmp_path, make_cfg, demo_dir):
    """FSDP2 on 2 ranks: the held-out loss falls and the weights change; `last.ckpt` is a directory
    of shards; a run cut short at step 6 and resumed with resume=auto ends with the uninterrupted
    run's weights bit for bit (optimiser, schedule and data position restored); the final export
    reloads with transformers and gives the sharded model's logits."""
    full = _run(tmp_path, demo_dir, tmp_path / "full", "trainer=fsdp2")
    assert full["steps"] == STEPS and full["val/loss"] < full["val/loss_before"]
    weights = load_file(tmp_path / "full" / "export" / "model.safetensors")
    initial = _initial_weights(make_cfg)
    assert all(not torch.equal(weights[k], initial[k]) for k in weights if "layers.0.mlp" in k)
    _check_export_matches_sharded_logits(tmp_path / "full")
    assert (tmp_path / "full" / "exports" / "step_000004" / "export" / "model.safetensors").is_file()
    assert len((tmp_path / "full" / "samples.jsonl").read_text().splitlines()) == 2 * 4  # steps 4 and 8, rank 0 only

    cut = tmp_path / "cut"
    _run(tmp_path, demo_dir, cut, "trainer=fsdp2", "+callbacks.stop._target_=__main__.StopAfter",
         "+callbacks.stop.step=6")
    last = cut / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 6 and meta["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"consumed": 6}]
    assert not list(cut.glob("checkpoints/.*"))  # no temporary directories left behind

    resumed = _run(tmp_path, demo_dir, cut, "trainer=fsdp2", "resume=auto")
    assert resumed["steps"] == STEPS and "val/loss_before" not in resumed  # resumed, not restarted
    resumed_weights = load_file(cut / "export" / "model.safetensors")
    assert resumed_weights.keys() == weights.keys()
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights), "resumed weights differ"


@pytest.mark.slow
def test_fsdp1_sft_trains_checkpoints_sharded_and_exports(tmp_path, demo_dir):
    """FSDP1 (`trainer=fsdp`, the stage wraps the model) on 2 CPU ranks: sharded checkpoint
    directories, samples generated by every rank, and an export with the sharded model's logits."""
    metrics = _run(tmp_path, demo_dir, tmp_path / "run", *FSDP1_ON_CPU)
    assert metrics["steps"] == STEPS and metrics["val/loss"] < metrics["val/loss_before"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2
    _check_export_matches_sharded_logits(tmp_path / "run")
