"""bench/gpu_check.sh: every GPU row's config composes and passes the config check; bad input is one
line (tests/e2e/test_gpu_check_dry_run.py runs the CPU-possible rows)."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_check import ROWS, VLLM_PYTHON, check, main, overrides
from llm_stages.config import compose


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
