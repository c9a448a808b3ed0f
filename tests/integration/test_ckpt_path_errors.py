"""`ckpt_path=last` in a run dir without a checkpoint is one config line, raised before any training
(tests/e2e/test_fault_tolerance.py kills and resumes real runs)."""

from __future__ import annotations

import pytest

from llm_stages.errors import ConfigError
from llm_stages.train import train


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^ckpt_path=last: no checkpoint at .*empty/checkpoints/last\.ckpt"):
        train(make_cfg("stage=sft", "ckpt_path=last", output_dir=tmp_path / "empty"))
