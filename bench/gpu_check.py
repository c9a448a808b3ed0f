"""`bash bench/gpu_check.sh` (this module's main): a GPU machine checked in one command, one table.

Each row is a run of `python -m llm_stages ...` in its own process, timed by bench.ours.LightningClock:
every stage for 20 steps on `model=qwen_0_5b_init` with `trainer=gpu` (bf16-mixed), SFT under
`trainer=fsdp2` on one device, `peft=qlora` and `trainer=deepspeed` (ZeRO-2), the MFU of packed SFT
at 16 x 2048 tokens, and GRPO with the vLLM backend (VLLM_OVERRIDES) when `.venv-vllm` exists. Each row has a time
limit and the whole check a budget (8 minutes), so a hung row costs its limit, not the check.

`--dry-run` (CPU): the same rows' configs composed and checked (llm_stages.checks.check_config); the
rows a CPU can run, run for real on the tiny model for 2 steps with `trainer=cpu`; rows that need
CUDA are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.clock import summarise
from bench.ours import LightningClock
from llm_stages.checks import DEFAULT_VLLM_PYTHON as VLLM_PYTHON  # where `make vllm` puts it

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 460  # from the command's start (gpu_check.sh: DeepSpeed's install too) to the last row's end
# GRPO's generation through vLLM: the overrides that select it. The trainer runs in this environment and
# starts its vLLM server with the `make vllm` one (rollout.vllm.python, default .venv-vllm/bin/python).
VLLM_OVERRIDES = ("rollout.backend=vllm",)
GRPO = ("stage=grpo", "module.num_generations=4", "datamodule.batch_size=4", "module.mini_batch_size=16",
        "module.ppo_epochs=1", "rollout.generation.max_new_tokens=32")


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    trainer: str = "gpu"        # trainer=<this>; under --dry-run `gpu` becomes `cpu`
    needs: str | None = None    # "deepspeed" / "vllm": CUDA and that package (else skipped; --dry-run skips it)
    limit_s: int = 60           # this row's process is stopped after this long
    mfu: bool = False           # report MFU (dense training rows; RL steps are mostly decoding)
    gpu_only: tuple[str, ...] = ()  # overrides for the GPU run only (sizes a CPU cannot run quickly)


# In order of importance: rows left when the budget is spent are skipped.
ROWS = [
    Row("sft_packed_mfu", ("stage=sft", "datamodule.packing=true", "data.path=${paths.data_dir}/sft_packed.jsonl"),
        mfu=True, limit_s=90, gpu_only=("datamodule.batch_size=16", "datamodule.max_length=2048")),
    Row("pt", ("stage=pt", "datamodule.block_size=256"), mfu=True),
    Row("sft", ("stage=sft",), mfu=True),
    Row("rm", ("stage=rm",), mfu=True),
    Row("dpo", ("stage=dpo",), limit_s=75),
    Row("kto", ("stage=kto",), limit_s=75),
    Row("ppo", ("stage=ppo", "+rollout.rewards.equation={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.demo_equation, "
                "_partial_: true}}", "datamodule.batch_size=8", "module.mini_batch_size=8", "module.ppo_epochs=1",
                "rollout.generation.max_new_tokens=32"), limit_s=90),
    Row("grpo", GRPO, limit_s=75),
    Row("sft_fsdp2", ("stage=sft", "trainer.devices=1"), trainer="fsdp2", mfu=True),
    Row("sft_qlora", ("stage=sft", "peft=qlora", "peft.quantization.compute_dtype=bfloat16")),
    Row("sft_deepspeed", ("stage=sft", "trainer.devices=1"), trainer="deepspeed", needs="deepspeed", limit_s=90, mfu=True),
    Row("grpo_vllm", (*GRPO, *VLLM_OVERRIDES), needs="vllm", limit_s=90),
]


class RowClock(LightningClock):
    """bench.ours.LightningClock, whose record also holds what the table needs beyond the step times."""

    def on_train_end(self, trainer, pl_module) -> None:
        from llm_stages.training.perf import peak_memory_gb  # what every run logs as perf/peak_*

        peak = peak_memory_gb(trainer)
        self.clock.dump(self.path, params=sum(p.numel() for p in pl_module.model.parameters()),
                        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                        cuda_max_allocated_gb=peak.get("perf/cuda_max_allocated_gb"),
                        peak_rss_gb=peak["perf/peak_rss_gb"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on CPU: check every row's config, run the CPU-possible rows")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated subset of the rows")
    parser.add_argument("--steps", type=int, default=None, help="steps per row (default 20; 2 with --dry-run)")
    parser.add_argument("--workdir", default=str(REPO / "bench" / "results" / "gpu_check"))
    parser.add_argument("--budget-s", type=int, default=BUDGET_S,
                        help="seconds from the start ($GPU_CHECK_START, set by gpu_check.sh) by which every row must end "
                             "(not under --dry-run)")
    args = parser.parse_args(argv)
    known = {r.name for r in ROWS}
    unknown = [n for n in args.rows.split(",") if n not in known]
    if unknown:
        parser.error(f"--rows {','.join(unknown)}: unknown; known: {', '.join(r.name for r in ROWS)}")
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (one warm-up step and one timed)")
    return args


def overrides(row: Row, *, dry_run: bool, steps: int, workdir: Path) -> list[str]:
    trainer = "cpu" if dry_run and row.trainer == "gpu" else row.trainer
    model = "model=tiny" if dry_run else "model=qwen_0_5b_init"
    return [model, f"trainer={trainer}", *row.overrides, *([] if dry_run else row.gpu_only),
            f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "validate_before_fit=false",
            "export.enabled=false", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", f"paths.data_dir={workdir / 'data'}",
            "+callbacks.gpu_check._target_=bench.gpu_check.RowClock", f"+callbacks.gpu_check.path={workdir / row.name}.json"]


def missing(row: Row, *, dry_run: bool) -> str | None:
    """Why `row` cannot run here, or None."""
    if row.needs == "vllm" and not VLLM_PYTHON.exists():
        return f"no vLLM environment ({VLLM_PYTHON.relative_to(REPO)}: make vllm)"
    if row.needs and not torch.cuda.is_available():
        return "no CUDA"
    if row.needs and dry_run:
        return "not run by --dry-run"
    if row.needs == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError, or DeepSpeed's own checks failing at import
            return f"deepspeed not importable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return None


def check(cli: list[str]) -> str | None:
    """The config a row would run, composed and checked as `python -m llm_stages` does (but for whether its
    GPUs are visible: the rows are checked here to run on a GPU machine); the error or None."""
    from llm_stages.checks import check_config
    from llm_stages.config import compose

    try:
        check_config(compose(cli), devices=False)
    except Exception as e:  # noqa: BLE001 - any failure is this row's status
        return f"config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def run_row(row: Row, cli: list[str], *, workdir: Path, limit_s: float, warmup: int, peak: float | None) -> dict:
    record_path, log_path = workdir / f"{row.name}.json", workdir / f"{row.name}.log"
    record_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "llm_stages", *cli, f"hydra.run.dir={workdir / 'runs' / row.name}"],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {limit_s:.0f}s (log: {log_path})", "wall_s": time.perf_counter() - started}
    out = {"wall_s": time.perf_counter() - started}
    if proc.returncode != 0 or not record_path.is_file():
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        return {**out, "status": f"failed (exit {proc.returncode}): {lines[-1][:120] if lines else 'no output'}"}
    record = json.loads(record_path.read_text())
    rates = summarise(record["steps"], warmup=min(warmup, len(record["steps"]) - 1))
    out.update(status="ok", steps_per_s=rates["steps_per_s"], tokens_per_s=rates["tokens_per_s"],
               cuda_gb=record.get("cuda_max_allocated_gb"), rss_gb=record["peak_rss_gb"], device=record["device"])
    if row.mfu and peak and rates["tokens_per_s"]:
        from llm_stages.training.perf import mfu

        out["mfu"] = mfu(record["params"], rates["tokens_per_s"], peak)
    return out


def prepare_data(workdir: Path, *, dry_run: bool) -> None:
    """The demo data the rows read, and a longer SFT file for packed rows (16 x 2048 tokens a step)."""
    from llm_stages.data.demo import write_demo_data

    demo = workdir / "data" / "demo"
    paths = write_demo_data(demo, seed=0, n_train=400 if dry_run else 2000, n_val=64)
    sft = Path(paths.get("sft_train", demo / "sft_train.jsonl")).read_text()
    (workdir / "data" / "sft_packed.jsonl").write_text(sft * (1 if dry_run else 8))


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(results: list[tuple[Row, dict]]) -> str:
    lines = ["| row | status | steps/s | tokens/s | CUDA max alloc (GiB) | peak RSS (GiB) | MFU | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row, r in results:
        lines.append(f"| {row.name} | {r['status']} | {_fmt(r.get('steps_per_s'), '.2f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} "
                     f"| {_fmt(r.get('cuda_gb'), '.2f')} | {_fmt(r.get('rss_gb'), '.2f')} | {_fmt(r.get('mfu'), '.1%')} "
                     f"| {_fmt(r.get('wall_s'), '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("error: no CUDA device; on a CPU machine run `bash bench/gpu_check.sh --dry-run`", file=sys.stderr)
        return 2
    # The budget and the rows' limits are the GPU run's; on a (possibly busy) CPU rows may take longer.
    deadline = float("inf") if args.dry_run else float(os.environ.get("GPU_CHECK_START") or time.time()) + args.budget_s
    steps = args.steps or (2 if args.dry_run else 20)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_data(workdir, dry_run=args.dry_run)
    from llm_stages.training.perf import peak_tflops

    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device) if cuda else None
    started, results = time.perf_counter(), []
    for row in (r for r in ROWS if r.name in args.rows.split(",")):
        cli = overrides(row, dry_run=args.dry_run, steps=steps, workdir=workdir)
        reason = missing(row, dry_run=args.dry_run)
        left = deadline - time.time()
        if reason and row.needs == "vllm":
            result = {"status": f"skipped: {reason}"}  # the config check itself needs the vLLM environment
        elif problem := check(overrides(row, dry_run=False, steps=steps, workdir=workdir)) or (args.dry_run and check(cli)):
            result = {"status": problem}  # the GPU run's config, and under --dry-run the CPU run's too
        elif reason:
            result = {"status": f"skipped: {reason}" + ("; config checked" if args.dry_run else "")}
        elif left < 15:
            result = {"status": f"skipped: the check's {args.budget_s}s are spent"}
        else:
            limit_s = min(row.limit_s * (3 if args.dry_run else 1), left)
            result = run_row(row, cli, workdir=workdir, limit_s=limit_s, warmup=min(3, steps - 1), peak=peak)
        results.append((row, result))
        print(f"{row.name}: {result['status']}", file=sys.stderr, flush=True)
    setting = "tiny model, trainer=cpu (--dry-run)" if args.dry_run else "qwen_0_5b_init, bf16-mixed"
    title = (f"GPU check: {device}, {steps} steps per row, {setting}, {time.perf_counter() - started:.0f}s; "
             "target: MFU >= 45% for sft_packed_mfu on an H100/H200")
    report = f"{title}\n\n{table(results)}\n"
    (workdir / "table.md").write_text(report)
    print(report)
    failed = [row.name for row, r in results if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    if failed:
        print(f"failed rows: {', '.join(failed)} (logs in {workdir})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
