"""rollout.backend=vllm refused in one config line where its environment is missing or the backend is
unknown (tests/e2e/test_vllm_backend.py runs the server itself where .venv-vllm exists)."""

from __future__ import annotations

import pytest

from llm_stages.checks import check_config
from llm_stages.errors import ConfigError
from tests.e2e.test_vllm_backend import GRPO


def test_vllm_backend_without_its_environment_is_one_config_line(make_cfg, tmp_path):
    cfg = make_cfg(*GRPO, "rollout.backend=vllm", f"rollout.vllm.python={tmp_path}/nothing/bin/python")
    with pytest.raises(ConfigError, match="make vllm") as error:
        check_config(cfg)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="rollout.backend"):
        check_config(make_cfg(*GRPO, "rollout.backend=sglang"))
