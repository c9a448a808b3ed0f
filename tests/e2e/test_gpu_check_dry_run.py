"""bash bench/gpu_check.sh --dry-run: the CPU-possible GPU-check rows run for real, one table printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_dry_run_runs_the_cpu_rows_and_prints_one_table(tmp_path):
    rows = ["sft_packed_mfu", "dpo", "grpo", "sft_deepspeed", "grpo_vllm"]
    # PYTHON: the script's interpreter, else .venv/bin/python, else python3; this test's own interpreter
    # is the one that has the project and its dependencies wherever the tests run.
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--rows", ",".join(rows), "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| row | status | steps/s | tokens/s |") and len(table) == 2 + len(rows)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    status = {c[0]: c[1] for c in cells}
    for name in ("sft_packed_mfu", "dpo", "grpo"):
        assert status[name] == "ok", run.stdout
    assert status["sft_deepspeed"] == "skipped: no CUDA; config checked"
    if not (REPO / ".venv-vllm").exists():
        assert status["grpo_vllm"].startswith("skipped: no vLLM environment"), status["grpo_vllm"]
    steps_per_s = [float(c[2]) for c in cells if c[1] == "ok"]
    assert len(steps_per_s) == 3 and all(v > 0 for v in steps_per_s)
    assert (tmp_path / "table.md").read_text().count("\n| ") == 1 + len(rows)
