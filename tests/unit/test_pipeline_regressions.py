"""The pipeline's eval step names each export that is worse than the export it started from."""

from __future__ import annotations

from omegaconf import OmegaConf

from llm_stages.evaluate.run import regressions
from llm_stages.pipeline import _input_stage


def _result(accuracy, loss, source=None):
    result = {"tasks": {"arithmetic": {"metrics": {"accuracy": accuracy}}, "replies": {"metrics": {"loss": loss}}}}
    return {**result, "input": source} if source else result


def test_a_warning_for_each_export_worse_than_its_input():
    results = {"sft": _result(0.55, 0.40), "rm": _result(None, None, "sft"), "dpo": _result(0.42, 0.50, "sft"),
               "grpo": _result(0.71, 0.45, "sft"), "ppo": _result(0.55, 0.41, "sft")}
    assert regressions(results, "arithmetic/accuracy") == [
        "warning: dpo's export is worse than its input sft on arithmetic/accuracy: 0.5500 -> 0.4200"]
    # A lower-is-better metric: every export whose reply loss rose.
    assert [line.split("'")[0] for line in regressions(results, "replies/loss", "min")] == [
        "warning: dpo", "warning: grpo", "warning: ppo"]
    assert regressions(results, None) == []  # a suite without key_metric: no check


def test_a_stages_input_is_the_earlier_stage_whose_export_its_model_path_names(tmp_path):
    pipeline = OmegaConf.create({"dir": str(tmp_path), "stages": [{"name": "pt"}, {"name": "sft"}, {"name": "dpo"}]})
    assert _input_stage(pipeline, OmegaConf.create({"model": {"path": f"{tmp_path}/sft/export"}})) == "sft"
    assert _input_stage(pipeline, OmegaConf.create({"model": {"path": f"{tmp_path}/../{tmp_path.name}/pt/export"}})) == "pt"
    assert _input_stage(pipeline, OmegaConf.create({"model": {"path": "/elsewhere/export"}})) is None
    assert _input_stage(pipeline, OmegaConf.create({"model": {"path": None}})) is None
