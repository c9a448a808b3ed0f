"""Evaluation without training: `python -m llm_stages stage=eval model.path=<export> eval=<suite>`.

A suite (conf/eval/<name>.yaml) is a set of tasks, each with its own data and type; each type is
one module here with a `run(context, name, task) -> TaskResult` (generation, preference,
likelihood), registered by type in `run.TASK_TYPES`; `run.py` loads the model once, runs the
suite and writes results.json, a markdown table and a W&B table. `lm_eval_adapter.run_lm_eval` runs
lm-evaluation-harness tasks on a loaded model.
"""
