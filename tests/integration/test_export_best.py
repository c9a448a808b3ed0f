"""export.weights=best: the export holds the checkpoint with the best stage.key_metric, not the last weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llm_stages.checks import check_config
from llm_stages.errors import ConfigError
from llm_stages.train import train


# The held-out loss falls at every validation (6.92 -> 5.56 -> 4.88 -> 3.64 -> 3.23 seen), so with
# "best" = the highest loss the best checkpoint is the first validation's (step 3 of 12), and the
# weights before training beat every checkpoint.
HIGHEST_LOSS_IS_BEST = ["stage=sft", "callbacks=default", "callbacks.generation_samples=null", "export.weights=best",
                        "stage.key_metric_mode=max", "trainer.max_steps=12", "trainer.val_check_interval=3",
                        "optim.lr=0.05", "optim.warmup_steps=0"]


def test_best_export_is_the_best_checkpoint_and_reports_its_metric(make_cfg, tmp_path):
    metrics = train(make_cfg(*HIGHEST_LOSS_IS_BEST, "validate_before_fit=false", output_dir=tmp_path / "best"))
    [best] = (tmp_path / "best" / "checkpoints").glob("step*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert metrics["export_step"] == checkpoint["global_step"] == 3 and metrics["steps"] == 12
    # The final validation ran on the restored weights: `after` is the best score, not the last one.
    assert metrics["val/loss"] == pytest.approx(metrics["val/loss_best"], rel=1e-5)
    exported = load_file(tmp_path / "best" / "export" / "model.safetensors")
    saved = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert exported and all(torch.equal(v, saved[k]) for k, v in exported.items())


def test_best_export_is_the_starting_weights_when_no_checkpoint_beats_them(make_cfg, tmp_path):
    metrics = train(make_cfg(*HIGHEST_LOSS_IS_BEST, output_dir=tmp_path / "start"))
    assert metrics["export_step"] == 0 and metrics["val/loss_before"] > metrics["val/loss_best"]
    assert metrics["val/loss"] == pytest.approx(metrics["val/loss_before"], rel=1e-5)


def test_best_export_needs_a_checkpoint_that_keeps_the_best(make_cfg):
    with pytest.raises(ConfigError, match=r"export.weights=best .* no callback keeps one: use callbacks=default"):
        check_config(make_cfg("stage=sft", "export.weights=best"))  # debug=tiny: callbacks=none
    with pytest.raises(ConfigError, match=r"export.weights=sometimes: expected last .* or best"):
        check_config(make_cfg("stage=sft", "export.weights=sometimes"))


def test_a_checkpoint_must_beat_the_starting_weights_by_min_delta(make_cfg, tmp_path):
    falling = ["stage=sft", "callbacks=default", "callbacks.generation_samples=null", "export.weights=best",
               "trainer.max_steps=6", "trainer.val_check_interval=3", "optim.lr=0.05", "optim.warmup_steps=0"]
    beaten = train(make_cfg(*falling, output_dir=tmp_path / "small"))
    gain = beaten["val/loss_before"] - beaten["val/loss_best"]  # the loss falls: the checkpoint is exported
    assert gain > 0.1 and beaten["export_step"] == 6
    kept = train(make_cfg(*falling, f"export.min_delta={gain + 0.01}", output_dir=tmp_path / "large"))
    assert kept["export_step"] == 0  # the same gain, short of min_delta: the starting weights are exported
    assert kept["val/loss"] == pytest.approx(kept["val/loss_before"], rel=1e-5)
    with pytest.raises(ConfigError, match=r"export.min_delta=-1: expected a number >= 0"):
        check_config(make_cfg("stage=sft", "export.min_delta=-1"))
