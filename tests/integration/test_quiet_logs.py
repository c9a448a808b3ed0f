"""A normal run's output carries no third-party notices (bitsandbytes' kernels message, Lightning's
tips, torch pytree deprecations, transformers' generation-config notices, W&B's anonymous-mode
warning), while the run's own lines and other warnings of the same libraries still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from llm_stages.training.quiet import quiet_third_party
from tests.conftest import REPO, TEST_MODEL

NOISE = ["gemm_4bit_forward", "kernels-community", "💡 Tip", "litlogger", "LeafSpec", "_register_pytree_node",
         "generation flags are not valid", "Setting `pad_token_id`", "anonymous"]


def _run(args: list[str], cwd, stdin: str | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "llm_stages", *args], capture_output=True, text=True, cwd=cwd,
                         input=stdin, env=env, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_a_training_run_and_a_chat_print_no_third_party_notices(tmp_path, demo_dir):
    # experiment=demo_sft with its callbacks (generation samples) and the W&B logger (offline), from scratch.
    run_dir = tmp_path / "sft"
    output = _run(["experiment=demo_sft", "model.path=null", *TEST_MODEL, f"paths.data_dir={demo_dir.parent}",
                   f"paths.log_dir={tmp_path}/runs", f"hydra.run.dir={run_dir}", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "logger=wandb"], cwd=tmp_path)
    assert "held-out loss" in output and f"export: {run_dir}/export" in output
    assert [n for n in NOISE if n in output] == [], output[-3000:]
    assert output.count("GPU available: False") == 1, output[-3000:]  # Lightning's console handler and the run's: once

    chat = _run(["chat", f"model.path={run_dir}/export", "generation.do_sample=false", "generation.max_new_tokens=4"],
                cwd=tmp_path, stdin="hello\n/quit\n")
    assert [n for n in NOISE if n in chat] == [], chat


def test_only_the_named_notices_are_dropped(caplog):
    quiet_third_party()
    quiet_third_party()  # twice: still one filter per logger
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(ops.filters) == 1
    with caplog.at_level(logging.INFO):
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        ops.warning("a real bitsandbytes warning")
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info("💡 Tip: For seamless cloud logging ...")
        rank_zero.info("GPU available: False, used: False")
        logging.getLogger("transformers.generation.configuration_utils").warning(
            "The following generation flags are not valid and may be ignored: ['temperature'].")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes warning", "GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()  # after simplefilter: its filters go first
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("`torch.utils._pytree._register_pytree_node` is deprecated. Please use ...", FutureWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation"]
