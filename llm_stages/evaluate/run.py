"""`evaluate(cfg)` (stage=eval) and `generate(cfg)` (python -m llm_stages generate): load the model
once through models.py — with the scalar head when `model.path` is an RM export — run each task of
the suite (`eval:` config group), write `<output_dir>/results.json`, print a markdown table and,
with the W&B logger, log it as the table `eval/results`. Nothing is trained."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from llm_stages.checks import check_config
from llm_stages.config import CONFIG_DIR
from llm_stages.data.demo import ensure_configured
from llm_stages.errors import ConfigError
from llm_stages.evaluate import episodes, generation, likelihood, lm_eval_adapter, preference
from llm_stages.evaluate.task import EvalContext, TaskFn, TaskResult
from llm_stages.models import check_model_dir, load_model, load_tokenizer
from llm_stages.training.quiet import quiet_third_party
from llm_stages.training.run_dir import write_text_atomic

log = logging.getLogger(__name__)

COLUMNS = ["task", "type", "metric", "value", "examples"]
# A task's `type` -> its module's run(context, name, task) -> TaskResult. A new type: one module, one line.
TASK_TYPES: dict[str, TaskFn] = {"generation": generation.run, "episodes": episodes.run, "preference": preference.run,
                                 "likelihood": likelihood.run,
                                 "lm_eval": lm_eval_adapter.run}


def suites() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "eval").glob("[!_]*.yaml"))


def model_head(model_cfg) -> str:
    """"reward" for a checkpoint whose architecture is a sequence classifier (an RM export), else "causal_lm"."""
    path = model_cfg.get("path")
    if not path or not (Path(str(path)) / "config.json").is_file():
        return "causal_lm"
    architectures = json.loads((Path(str(path)) / "config.json").read_text()).get("architectures") or []
    return "reward" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"


def load_context(cfg: DictConfig, *, batch_size: int, output_dir: Path) -> EvalContext:
    L.seed_everything(cfg.seed, verbose=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg.model)
    head = model_head(cfg.model)
    model = load_model(cfg.model, tokenizer, head=head).to(device).eval().requires_grad_(False)
    suite = cfg.get("eval") or {}
    reference_cfg = suite.get("reference_model") or {}
    reference = None
    if reference_cfg.get("path") and head == "causal_lm":
        if load_tokenizer(reference_cfg).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"eval.reference_model.path={reference_cfg.path} uses a different vocabulary than the model; "
                              "implicit rewards compare log-probs of the same tokens (use the model's own base, e.g. its SFT export)")
        reference = load_model(reference_cfg, tokenizer).to(device).eval().requires_grad_(False)
    reward_model = suite.get("reward_model") if (suite.get("reward_model") or {}).get("path") else None
    return EvalContext(model, tokenizer, head, device, int(cfg.seed), batch_size, output_dir, reward_model, reference,
                       progress=bool(suite.get("progress_bar", True)))


def check_suite(cfg: DictConfig) -> DictConfig:
    suite = cfg.get("eval")
    if not suite:
        raise ConfigError(f"stage=eval needs a suite: eval=<one of {', '.join(suites())}>")
    tasks = suite.get("tasks") or {}
    dropped = [name for name, task in tasks.items() if task is None]
    if dropped:  # eval.tasks.<name>=null on the command line leaves that task out (Hydra cannot delete a key)
        with open_dict(suite):
            for name in dropped:
                del suite.tasks[name]
    if not tasks:
        raise ConfigError(f"eval={suite.get('name')} has no tasks (eval.tasks: {{name: {{type: ..., data: {{path: ...}}}}}})")
    for key in ("reward_model", "reference_model"):
        if (suite.get(key) or {}).get("path"):
            check_model_dir(suite[key].path, key=f"eval.{key}.path")
    for name, task in tasks.items():
        if task.get("type") not in TASK_TYPES:
            raise ConfigError(f"eval.tasks.{name}.type={task.get('type')}: unknown task type; known: "
                              f"{', '.join(sorted(TASK_TYPES))}")
    return suite


def evaluate(cfg: DictConfig, *, report: bool = True) -> dict:
    """Run the suite `cfg.eval` on `cfg.model`; returns what results.json holds. `report`: print the
    table and log it to W&B (a pipeline's eval step reports one table of all its exports instead)."""
    quiet_third_party()
    check_config(cfg)
    suite = check_suite(cfg)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    ctx = load_context(cfg, batch_size=int(suite.get("batch_size", 32)), output_dir=output_dir)
    results = []
    for name, task in suite.tasks.items():
        result = TASK_TYPES[task.type](ctx, name, task)
        log.info("eval %s: %s", name, result.skipped or ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
        results.append(result)
    summary = {"suite": suite.get("name"), "model": str(cfg.model.get("path") or cfg.model.get("name")),
               "head": ctx.head, "seed": int(cfg.seed), "tasks": {r.name: _as_json(r) for r in results}}
    write_text_atomic(output_dir / "results.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if report:
        print(markdown_table(COLUMNS, table_rows(results)))
        _log_wandb(cfg, results)
    return {**summary, "output_dir": str(output_dir)}


def _as_json(result: TaskResult) -> dict:
    metrics = {k: None if math.isnan(v) else v for k, v in result.metrics.items()}  # NaN (undefined): null in JSON
    return {"type": result.type, "examples": result.examples, "metrics": metrics, **result.details,
            **({"skipped": result.skipped} if result.skipped else {})}


def table_rows(results: list[TaskResult]) -> list[list]:
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.name, r.type, "-", f"skipped: {r.skipped}", r.examples])
        rows += [[r.name, r.type, metric, value, r.examples] for metric, value in r.metrics.items()]
    return rows


def cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def log_wandb_table(cfg: DictConfig, key: str, columns: list[str], rows: list[list], *, name: str, directory: Path,
                    job_type: str = "eval") -> None:
    """With the W&B logger (offline by default): a run `name` holding the table `key`."""
    settings = (cfg.get("logger") or {}).get("wandb")
    if not settings:
        return
    import wandb

    run = wandb.init(project=settings.project, group=cfg.get("group"), job_type=job_type, name=name, dir=str(directory),
                     mode="offline" if settings.get("offline", True) else None, reinit="finish_previous",
                     settings=wandb.Settings(x_disable_meta=True))
    run.log({key: wandb.Table(columns=columns, data=[[cell(v) if isinstance(v, float) else v for v in row]
                                                     for row in rows])})
    run.finish()


def _log_wandb(cfg: DictConfig, results: list[TaskResult]) -> None:
    log_wandb_table(cfg, "eval/results", COLUMNS, table_rows(results), name=f"eval-{cfg.eval.get('name')}",
                    directory=Path(str(cfg.paths.output_dir)))


def evaluate_exports(pipeline: DictConfig, step: DictConfig, overrides: list[str],
                     inputs: dict[str, str] | None = None) -> dict:
    """A pipeline's eval step: the suite its overrides compose, run on the export of each stage in
    `step.evaluate` (`<pipeline.dir>/<stage>/export`), each in `<pipeline.dir>/<step>/<stage>`; one table,
    a row per export, with the suite's `summary` metrics as columns (default: each task's first).
    `inputs`: the stage whose export each stage started from; results.json records it, and `warnings`
    holds a line for each export that lowers the suite's `key_metric` of its input."""
    from llm_stages.config import compose

    directory = Path(str(pipeline.dir)) / step.name
    results, cfg = {}, None
    for stage in step.evaluate:
        export = Path(str(pipeline.dir)) / stage / "export"
        cfg = compose([*overrides, f"model.path={export}"], output_dir=str(directory / stage))
        if cfg.stage.name != "eval":
            raise ConfigError(f"pipeline.stages.{step.name}: `evaluate:` needs overrides that select stage=eval "
                              f"(e.g. experiment=demo_eval or stage=eval eval=demo); got stage={cfg.stage.name}")
        log.info("pipeline %s: evaluating %s", pipeline.name, export)
        results[stage] = evaluate(cfg, report=False)
        if (inputs or {}).get(stage):
            results[stage]["input"] = inputs[stage]
    first = next(iter(results.values()))["tasks"]
    summary = list(cfg.eval.get("summary") or [f"{n}/{next(iter(t['metrics']))}" for n, t in first.items() if t["metrics"]])
    columns = ["export", *summary]
    rows = [[stage, *(_metric(result, key) for key in summary)] for stage, result in results.items()]
    table = markdown_table(columns, rows)
    write_text_atomic(directory / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text_atomic(directory / "table.md", table + "\n")
    log_wandb_table(cfg, "pipeline/eval", columns, rows, name=f"pipeline-{pipeline.name}-eval", directory=directory)
    return {"table": table, "rows": rows, "columns": columns, "dir": str(directory),
            "warnings": regressions(results, cfg.eval.get("key_metric"), cfg.eval.get("key_metric_mode", "max"))}


def regressions(results: dict, key: str | None, mode: str = "max") -> list[str]:
    """One line for each export whose `key` (task/metric) is worse than that of the export it started
    from (`results[stage]["input"]`), e.g. a preference stage that ranks pairs better while answering worse."""
    if not key:
        return []
    lines = []
    for stage, result in results.items():
        source = result.get("input")
        if source not in results:
            continue
        before, after = _metric(results[source], key), _metric(result, key)
        if before is None or after is None:
            continue
        if (after < before) if mode == "max" else (after > before):
            lines.append(f"warning: {stage}'s export is worse than its input {source} on {key}: {before:.4f} -> {after:.4f}")
    return lines


def _metric(result: dict, key: str) -> float | None:
    task, _, metric = key.partition("/")
    return result["tasks"].get(task, {}).get("metrics", {}).get(metric)


def generate(cfg: DictConfig) -> Path:
    """`python -m llm_stages generate model.path=... data.path=prompts.jsonl`: completions of every
    prompt as jsonl (prompt, completion, the record's id fields), with the generation task's sampler."""
    quiet_third_party()
    check_config(cfg)
    settings = cfg.generate
    output = Path(str(settings.output))
    ctx = load_context(cfg, batch_size=int(settings.batch_size), output_dir=output.parent)
    if ctx.head != "causal_lm":
        raise ConfigError(f"model.path={cfg.model.path} is a reward model (a scalar head); generate needs a language model")
    data = OmegaConf.create({**OmegaConf.to_container(cfg.data, resolve=True), "val_path": None, "cache_dir": None})
    ensure_configured(data)  # data=demo_rl: the demo files, written on first use
    read = generation.read_prompts(ctx, data, int(settings.max_prompt_length))
    n = int(settings.num_samples)
    chunks = generation.sample_replies(ctx, [e for _, e in read], settings.generation, num_samples=n)
    rows = generation.completion_rows([r for r, _ in read], chunks, n)
    generation.write_jsonl(output, rows)
    print(f"{len(rows)} completions of {len(read)} prompts: {output}")
    return output
