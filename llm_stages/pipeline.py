"""Several stages from one command: `python -m llm_stages pipeline=demo [overrides]`.

A pipeline config (conf/pipeline/*.yaml) names a directory and a list of stages, each with the
overrides that make its config. Stage `s` runs in `<pipeline.dir>/<s>` and exports to
`<pipeline.dir>/<s>/export`, so a later stage loads it with an override such as
`model.path=${pipeline.dir}/sft/export` (visible in that stage's composed config). Overrides
given on the command line apply to every stage (e.g. `model=qwen trainer=gpu`). A stage whose
export already exists is skipped unless `pipeline.force=true`. A step with `evaluate: [stages]`
trains nothing: it runs the eval suite its overrides select on each of those stages' exports and
ends the run with one table, a row per export (llm_stages.evaluate.run.evaluate_exports).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from llm_stages.config import compose

log = logging.getLogger(__name__)

COLUMNS = ["stage", "status", "steps", "wall_s", "metric", "before", "after", "export"]


def stage_overrides(pipeline: DictConfig, stage: DictConfig, cli_overrides: list[str]) -> list[str]:
    """The overrides of one stage: its own, then the command line's; its runs share the pipeline's group."""
    return [*stage.overrides, *cli_overrides, f"group={pipeline.name}"]


def run_pipeline(cfg: DictConfig, cli_overrides: list[str]) -> list[dict]:
    """Run (or skip) every stage in order; returns one summary row per stage."""
    from llm_stages.train import train

    pipeline = cfg.pipeline
    rows = []
    eval_tables = []
    inputs: dict[str, str] = {}  # stage -> the earlier stage whose export it starts from
    for stage in pipeline.stages:
        if stage.get("evaluate"):  # an eval step: the suite on earlier stages' exports, nothing trained
            from llm_stages.evaluate.run import evaluate_exports

            started = time.perf_counter()
            eval_tables.append(evaluate_exports(pipeline, stage, stage_overrides(pipeline, stage, cli_overrides), inputs))
            rows.append(_row(stage.name, "ran", wall_s=round(time.perf_counter() - started, 1),
                             export=eval_tables[-1]["dir"]))
            continue
        output_dir = Path(str(pipeline.dir)) / stage.name
        export = output_dir / "export"
        stage_cfg = compose(stage_overrides(pipeline, stage, cli_overrides), output_dir=str(output_dir))
        source = _input_stage(pipeline, stage_cfg)
        if source:
            inputs[stage.name] = source
        if any((export / f).is_file() for f in ("config.json", "adapter_config.json")) and not pipeline.get("force"):
            log.info("pipeline %s: stage %s skipped, its export exists (%s); pipeline.force=true reruns it",
                     pipeline.name, stage.name, export)
            rows.append(_row(stage.name, "skipped", export=str(export)))
            continue
        log.info("pipeline %s: stage %s starts in %s", pipeline.name, stage.name, output_dir)
        started = time.perf_counter()
        metrics = train(stage_cfg)
        key = metrics["key_metric"]
        rows.append(_row(stage.name, "ran", steps=metrics.get("steps"), wall_s=round(time.perf_counter() - started, 1),
                         metric=key, before=metrics.get(f"{key}_before"), after=metrics.get(key),
                         export=metrics.get("export_dir", "")))
    log.info("pipeline %s summary\n%s", pipeline.name, format_table(rows))
    _log_wandb_table(cfg, rows)
    for table in eval_tables:  # last: what every export does on the held-out data
        warnings = "".join(f"\n{line}" for line in table["warnings"])
        print(f"\npipeline {pipeline.name}: evaluation ({table['dir']})\n{table['table']}{warnings}")
    return rows


def _input_stage(pipeline: DictConfig, stage_cfg: DictConfig) -> str | None:
    """The earlier stage of this pipeline whose export `stage_cfg` starts from (its model.path), if any."""
    path = stage_cfg.model.get("path")
    if not path:
        return None
    for earlier in pipeline.stages:
        if Path(str(pipeline.dir), earlier.name, "export").resolve() == Path(str(path)).resolve():
            return str(earlier.name)
    return None


def _row(stage: str, status: str, **values) -> dict:
    return {"stage": stage, "status": status, **{c: values.get(c) for c in COLUMNS[2:]}}


def format_table(rows: list[dict]) -> str:
    def cell(value, column: str) -> str:
        if value is None:
            return "-"
        if column == "wall_s":
            return f"{value:.1f}"
        return f"{value:.4f}" if isinstance(value, float) and not float(value).is_integer() else str(value)

    cells = [COLUMNS] + [[cell(row[c], c) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells)


def _log_wandb_table(cfg: DictConfig, rows: list[dict]) -> None:
    """With the W&B logger: a `pipeline` run in the pipeline's group holding the summary table."""
    settings = (cfg.get("logger") or {}).get("wandb")
    if not settings:
        return
    import wandb

    run = wandb.init(project=settings.project, group=str(cfg.pipeline.name), job_type="pipeline",
                     name=f"pipeline-{cfg.pipeline.name}", dir=str(cfg.pipeline.dir),
                     mode="offline" if settings.get("offline", True) else None, reinit="finish_previous")
    run.log({"pipeline/summary": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])})
    run.finish()
