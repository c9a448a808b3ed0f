"""Multi-node launch settings read without launching anything: which rank this process is (from torchrun,
SLURM or Lightning variables), and the one run dir every node must be told (tests/e2e/test_multinode.py
launches two nodes)."""

from __future__ import annotations

import pytest

from llm_stages.__main__ import check_run_dir_shared
from llm_stages.errors import ConfigError
from llm_stages.training.launch import launch_rank, log_file_suffix


def test_launch_rank_reads_torchrun_slurm_or_lightning_variables(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launch_rank() == "0" and log_file_suffix() == ""
    monkeypatch.setenv("NODE_RANK", "1")
    assert launch_rank() == "1.0" and log_file_suffix("__main__") == "_rank1.0"
    assert log_file_suffix("train_ddp_process_1") == ""  # Lightning's own child: its job name names its log
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert launch_rank() == "3"
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank wins
    assert launch_rank() == "0"


def test_several_nodes_need_one_named_run_dir(make_cfg):
    cfg = make_cfg("trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1")
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2: pass hydra.run.dir="):
        check_run_dir_shared(cfg, [])
    check_run_dir_shared(cfg, ["hydra.run.dir=/shared/runs/sft"])
    check_run_dir_shared(make_cfg(), [])  # one node: the default timestamped dir is fine
