"""bench/gpu_check.sh: every GPU row's config composes and passes the config check; `--dry-run` runs
the CPU-possible rows for real and prints one table; bad input is one line."""

from __future__ import annotations

import subprocess

import pytest
import torch

from bench.gpu_check import ROWS, VLLM_PYTHON, check, main, overrides
from llm_stages.config import compose
from tests.conftest import REPO


def test_every_gpu_row_composes_and_passes_the_config_check(tmp_path):
    vllm_checkable = VLLM_PYTHON.exists() and "backend" in compose(["stage=grpo"]).rollout
    for row in ROWS:
        if row.needs == "vllm" and not vllm_checkable:
            continue  # its config check needs the vLLM environment (and the backend's config keys)
        assert check(overrides(row, dry_run=False, steps=20, workdir=tmp_path)) is None, row.name
    packed = overrides(next(r for r in ROWS if r.name == "sft_packed_mfu"), dry_run=False, steps=20, workdir=tmp_path)
    assert {"model=qwen_0_5b_init", "trainer=gpu", "datamodule.batch_size=16", "datamodule.max_length=2048"} <= set(packed)


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--dry-run", "--rows", "sft,nope"])
    assert exit_.value.code == 2 and "--rows nope: unknown; known: sft_packed_mfu, pt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([]) == 2
        assert capsys.readouterr().err.strip() == ("error: no CUDA device; on a CPU machine run "
                                                   "`bash bench/gpu_check.sh --dry-run`")


@pytest.mark.slow
def test_dry_run_runs_the_cpu_rows_and_prints_one_table(tmp_path):
    rows = ["sft_packed_mfu", "dpo", "grpo", "sft_deepspeed", "grpo_vllm"]
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--rows", ",".join(rows), "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
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
