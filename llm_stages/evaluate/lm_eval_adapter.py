"""lm-evaluation-harness on a model llm_stages loaded: any lm-eval task (hub datasets: needs their
download), or local ones from task YAML files in `include_path`, scored by lm-eval itself through its
HFLM wrapper around our already-loaded model and tokenizer.

lm-eval is an optional extra (`pip install '.[eval]'`, lm-eval 0.4.13), so it is imported on first
use; the model class is then also registered with lm-eval as `llm_stages`, loading the model from
our config's overrides:
    lm_eval.simple_evaluate(model="llm_stages", model_args={"overrides": "model.path=runs/demo/sft/export"}, tasks=[...])
"""

from __future__ import annotations

import functools
from pathlib import Path

from llm_stages.errors import ConfigError
from llm_stages.evaluate.task import TaskResult

INSTALL = "pip install '.[eval]' (lm-eval==0.4.13)"


@functools.cache
def llm_stages_lm() -> type:
    """lm-eval's HFLM taking a model loaded the llm_stages way, registered with lm-eval as `llm_stages`."""
    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness, which is not installed: {INSTALL}") from None

    @register_model("llm_stages")
    class LlmStagesLM(HFLM):
        """An already-loaded `pretrained` model and its `tokenizer`, or, without them, the model that
        `overrides` (space-separated, e.g. "model.path=runs/demo/sft/export model.dtype=bfloat16")
        select in our config, loaded by llm_stages.models as every stage loads it."""

        def __init__(self, pretrained=None, tokenizer=None, overrides: str = "", **kwargs):
            if pretrained is None:
                from llm_stages.config import compose
                from llm_stages.models import load_model, load_tokenizer

                model_cfg = compose(str(overrides).split()).model
                tokenizer = load_tokenizer(model_cfg)
                pretrained = load_model(model_cfg, tokenizer)
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)

    return LlmStagesLM


def run_lm_eval(model, tokenizer, tasks: list[str], *, num_fewshot: int | None = None, limit: int | float | None = None,
                batch_size: int = 1, include_path: str | list[str] | None = None, include_defaults: bool = True,
                seed: int = 1234) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of each lm-eval task (or group) on `model`, as lm-eval reports them
    (`acc`, `acc_stderr`, `acc_norm`, ...; a filter other than lm-eval's "none" stays in the name:
    `exact_match,strict-match`). `limit`: at most that many documents per task (a fraction: that share);
    `include_defaults=False` skips indexing lm-eval's ~15k bundled task files (~20 s) when every
    task comes from `include_path`."""
    lm_class = llm_stages_lm()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(f"lm-eval include_path={path}: no such directory (it holds task YAML files)")
    manager = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = " and ".join([*(["lm-eval's own tasks"] if include_defaults else []), *map(str, paths)])
        raise ConfigError(f"lm-eval tasks {unknown} are not in {where or 'no task directory'}; "
                          "`lm-eval ls tasks` lists lm-eval's, or add the directory of your task YAML to include_path")
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's `"acc,none": 0.5` as `"acc": 0.5`, and `sample_len` (documents scored); names,
    aliases and "N/A" standard errors left out."""
    return {name.removesuffix(",none"): value for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def run(ctx, name: str, task) -> TaskResult:
    """The eval stage's task type `lm_eval`: `{type: lm_eval, tasks: [...], num_fewshot, limit,
    include_path, include_defaults}` runs those lm-eval tasks on the model under evaluation; its
    figures are named `<lm-eval task>/<metric>`."""
    if ctx.head != "causal_lm":
        return TaskResult(name, "lm_eval", {}, 0, skipped="a reward model has no language-model head")
    tasks = list(task.get("tasks") or [])
    if not tasks:
        raise ConfigError(f"eval.tasks.{name}.tasks is empty: name the lm-eval tasks to run, "
                          f"e.g. eval.tasks.{name}.tasks=[arc_easy]")
    results = run_lm_eval(ctx.model, ctx.tokenizer, tasks, num_fewshot=task.get("num_fewshot"),
                          limit=task.get("limit"), batch_size=ctx.batch_size, include_path=task.get("include_path"),
                          include_defaults=task.get("include_defaults", True), seed=ctx.seed)
    metrics = {f"{t}/{k}": float(v) for t, values in results.items() for k, v in values.items() if k != "sample_len"}
    documents = int(sum(values.get("sample_len", 0) for values in results.values()))
    return TaskResult(name, "lm_eval", metrics, documents, details={"lm_eval_tasks": ", ".join(tasks)})
