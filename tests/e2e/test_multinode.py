"""Multi-node: two "nodes" of one process each on localhost, launched the way a cluster launches them
(`python -m llm_stages ... trainer.num_nodes=2` on each machine, MASTER_ADDR/MASTER_PORT/NODE_RANK
in the environment: Lightning's LightningEnvironment), sharing one run dir as nodes share a
filesystem. They follow one process with twice the batch, step for step, and global rank 0 alone
writes the run's files (checkpoints, export, metrics, .hydra/): the other node writes only its log."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm_stages.train import train
from tests.conftest import REPO, TEST_MODEL

STEPS = 4
COMMON = [f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=2",
          "trainer.log_every_n_steps=1", "validate_before_fit=false", "optim.warmup_steps=0", "optim.lr=1e-3",
          "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
STAGES = {"sft": ["stage=sft"], "dpo": ["stage=dpo"]}

# Runs the CLI, recording every file this process creates, writes, renames or removes (Python's
# audit events), into $AUDIT_OUT/writes_<launch rank>.json at exit.
AUDITED_CLI = """
import atexit, json, os, runpy, sys
from llm_stages.training.launch import launch_rank
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
touched = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (not mode and flags & WRITE_FLAGS):
            touched.append(os.fsdecode(args[0]))
    elif event == "os.rename":
        touched.extend([os.fsdecode(args[0]), os.fsdecode(args[1])])
    elif event in ("os.remove", "os.mkdir", "shutil.rmtree"):
        touched.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
atexit.register(lambda: open(os.path.join(os.environ["AUDIT_OUT"], f"writes_{launch_rank()}.json"), "x").write(json.dumps(touched)))
runpy.run_module("llm_stages", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _launch_two_nodes(tmp_path: Path, run_dir: Path, overrides: list[str]) -> dict[str, list[str]]:
    """Both nodes' processes, to the end; returns what each wrote, by launch rank."""
    script = tmp_path / "audited_cli.py"
    script.write_text(AUDITED_CLI)
    audit = tmp_path / "audit"
    audit.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    procs = [subprocess.Popen([sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "PYTHONPATH": str(REPO), "AUDIT_OUT": str(audit), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2"})
             for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return {path.stem.removeprefix("writes_"): json.loads(path.read_text()) for path in audit.glob("writes_*.json")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_nodes_follow_one_process_with_twice_the_batch_and_rank0_alone_writes(make_cfg, tmp_path, demo_dir, stage):
    per_rank = 4
    run_dir = tmp_path / "two_nodes"
    overrides = [*STAGES[stage], *COMMON, *TEST_MODEL, f"paths.data_dir={demo_dir.parent}", "trainer=ddp",
                 "trainer.num_nodes=2", "trainer.devices=1", f"datamodule.batch_size={per_rank}",
                 f"callbacks.periodic_checkpoint.every_n_train_steps={STEPS}"]
    writes = _launch_two_nodes(tmp_path, run_dir, overrides)

    single_dir = tmp_path / "single"
    train(make_cfg(*STAGES[stage], *COMMON, f"datamodule.batch_size={2 * per_rank}", output_dir=single_dir))
    single, nodes = _losses(single_dir), _losses(run_dir)
    assert len(single) == STEPS and len(set(single)) == STEPS  # a moving trajectory: a real comparison
    assert nodes == pytest.approx(single, rel=1e-4), (nodes, single)

    # One checkpoint set, one export, no duplicates or leftovers; written by global rank 0 only.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", f"step{STEPS:06d}.ckpt"]
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert not [p for p in run_dir.rglob(".*") if p.name != ".hydra"]  # no temporaries left behind
    assert sorted(writes) == ["0", "1.0"]
    root = run_dir.resolve()
    in_run = {rank: {Path(p).resolve().relative_to(root).parts[0] for p in paths if root in Path(p).resolve().parents}
              for rank, paths in writes.items()}
    assert {"checkpoints", "export", "csv", ".hydra", "__main__.log"} <= in_run["0"]
    assert in_run["1.0"] == {"__main___rank1.0.log"}, in_run["1.0"]
