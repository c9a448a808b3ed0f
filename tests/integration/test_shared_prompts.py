"""Prefix-shared pairs in the stages: DPO (ref=precompute) and RM take the same first step with
`datamodule.share_prompt=true` as with false (tests/e2e/test_smollm2_shared_prompts.py: SmolLM2's
log-probs and rewards)."""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_training import _first_step_grads

# Without length grouping: it sorts by each layout's own cost (the shared row, or the longer sequence),
# so with some data it batches the pairs differently, and the first steps would not be comparable.
COMMON = ["optim.max_grad_norm=null", "datamodule.batch_size=6", "datamodule.group_by_length=false"]


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_shared_prompts_take_the_same_first_step(make_cfg, stage):
    _assert_same_first_step(make_cfg, stage)


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_an_sft_export_takes_the_same_first_step_with_shared_prompts(make_cfg, tmp_path, stage):
    """As above, from what the SFT stage exported (weights trained, loaded back from disk), as a pipeline runs it."""
    from llm_stages.train import train

    sft = train(make_cfg("stage=sft", "trainer.max_steps=4", "trainer.val_check_interval=4", "optim.lr=1e-2",
                         output_dir=tmp_path / "sft"))
    _assert_same_first_step(make_cfg, stage, f"model.path={sft['export_dir']}")


def _assert_same_first_step(make_cfg, stage, *overrides):
    runs = {}
    for share in ("false", "true"):
        grads, module, datamodule = _first_step_grads(make_cfg(f"stage={stage}", *COMMON, *overrides,
                                                               f"datamodule.share_prompt={share}"))
        assert datamodule.shares_prompt is (share == "true")
        runs[share] = grads, module
    (shared, module_shared), (plain, module_plain) = runs["true"], runs["false"]
    assert shared.keys() == plain.keys() and plain
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], atol=1e-6, rtol=1e-4)
    if stage == "dpo":  # ref=precompute's cache reads the same numbers, pair by pair
        for split in ("train", "val"):
            torch.testing.assert_close(module_shared.reference_scores.cache[split], module_plain.reference_scores.cache[split],
                                       atol=1e-5, rtol=1e-5)
