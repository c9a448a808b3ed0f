"""llm_stages against TRL 1.16 in the same run, on identical settings.

    python -m bench [--model tiny|smollm2|qwen_0_5b_init] [--workloads sft,sft_packed,rm,dpo_precompute,dpo_copy,rm_shared,dpo_shared,rm_long,dpo_long,sft_2k,dpo_2k,grpo,ppo]
                    [--steps N] [--warmup K] [--repeats R] [--profile WORKLOAD] [--trainer cpu|gpu]
                    [--batch-size B] [--max-length T] [--peak-tflops P]

For each workload our stage and its baseline (TRL's trainer; for PPO a naive loop, bench/naive_ppo.py)
run back to back, each in its own process (so the peak RSS is its own), on the same checkpoint, the
same token ids, the same batch size, sequence length, optimiser (AdamW, constant lr) and number of
optimiser steps, with no evaluation, checkpointing or logging. Reported per side: steps/s, samples/s,
tokens/s (real, non-padding tokens), for RL rollout and update tokens/s, peak RSS (and CUDA max
allocated with --trainer gpu), and ours/baseline ratios; the first K steps are warm-up and not timed;
the median over R repeats. Writes bench/results/<date>-<model>.json and .md (the table, also printed).

MFU (model FLOPs utilisation) is reported where the device's peak is known (--trainer gpu on a GPU
in llm_stages/training/perf.py's table, or --peak-tflops): 6 x parameters x real tokens/s / peak for a
trained step (8 x for DPO with a reference copy), the PaLM estimate without attention FLOPs; padding
positions are not counted, so it is the useful-work MFU. A realistic GPU measurement needs more tokens
per step than the CPU defaults, e.g.
    python -m bench --model qwen_0_5b_init --trainer gpu --workloads sft_packed --batch-size 16 --max-length 2048

--profile WORKLOAD runs only our side of that workload under torch.profiler and writes a chrome trace
and a key_averages table (sorted by self CPU time) into bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.clock import summarise
from bench.workloads import OPTIM, WORKLOADS, Workload, optimiser_steps

MODELS = ["tiny", "smollm2", "qwen_0_5b_init"]  # configs in conf/model that need no network

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
DEFAULT_WORKLOADS = [name for name, w in WORKLOADS.items() if w.in_default_run]
RATIO_KEYS = ["steps_per_s", "samples_per_s", "tokens_per_s", "rollout_tokens_per_s", "update_tokens_per_s",
              "peak_rss_mb", "cuda_max_allocated_mb"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", default="smollm2", choices=MODELS,
                        help="tiny: smoke runs; smollm2: the CPU comparison; qwen_0_5b_init: Qwen2.5-0.5B's "
                             "architecture from config, random weights (GPU)")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help="comma-separated, from: " + ", ".join(WORKLOADS) + " (default: all but "
                             + ", ".join(n for n in WORKLOADS if n not in DEFAULT_WORKLOADS) + ")")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per workload (an RL step is one iteration); default: "
                             + ", ".join(f"{w.name} {w.steps}" for w in WORKLOADS.values()))
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side, median reported (default: 3 for "
                                                                   "smollm2, 1 for tiny)")
    parser.add_argument("--profile", metavar="WORKLOAD", default=None, help="profile our side of WORKLOAD only")
    parser.add_argument("--trainer", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="every workload's batch size (sequences, packed rows, pairs or prompts; default: its own)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="every workload's tokens per sequence / packed row (default: its own, 256)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU column (default: looked up for a known GPU)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    parser.add_argument("--workdir", default=None, help="keep checkpoints, data, specs and every process's log here "
                                                        "(default: a temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names + ([args.profile] if args.profile else []) if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    if args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error("--warmup must be >= 0 and --steps >= 1")
    if any(v is not None and v <= 0 for v in (args.batch_size, args.max_length, args.peak_tflops)):
        parser.error("--batch-size, --max-length and --peak-tflops must be positive")
    if args.workloads == parser.get_default("workloads") and not VLLM_PYTHON.exists():
        names = [n for n in names if not WORKLOADS[n].options.get("backend") == "vllm"]
        print("no .venv-vllm (make vllm): the grpo_vllm workload is left out", file=sys.stderr)
    args.workloads = [args.profile] if args.profile else names
    args.repeats = args.repeats or (3 if args.model == "smollm2" else 1)
    return args


# The environment the bench was started with: each side's process gets this, not what importing our
# side's code in this process set (llm_stages.lean_layers sets TRANSFORMERS_SDPA_FORCE_GQA on a machine
# without CUDA, which would otherwise reach TRL's process too).
LAUNCH_ENV = dict(os.environ)


# -- one child process ------------------------------------------------------------------------------
def run_child(spec: dict, workdir: Path, name: str) -> dict:
    """Run one side in its own process; its step record, summarised, plus peak RSS (ru_maxrss of the
    child, via wait4) and the process's wall time. On failure: {"error": <last lines of its output>}."""
    spec_path, log_path = workdir / f"{name}.spec.json", workdir / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**LAUNCH_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), LAUNCH_ENV.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.child", str(spec_path)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    try:
        if status != 0:
            raise RuntimeError(f"exit status {os.waitstatus_to_exitcode(status)}")
        record = json.loads(Path(spec["result_path"]).read_text())
        result = summarise(record["steps"], spec["warmup"])
    except (RuntimeError, OSError, ValueError) as e:
        tail = log_path.read_text(errors="replace")[-3000:]
        print(f"  {name} FAILED ({e}); the end of its output:\n{tail}", file=sys.stderr)
        return {"error": f"{e}\n{tail}"}
    result.update(steps_recorded=len(record["steps"]), peak_rss_mb=usage.ru_maxrss / 1024, wall_s=wall)
    if record.get("cuda_max_allocated_mb") is not None:
        result["cuda_max_allocated_mb"] = record["cuda_max_allocated_mb"]
    return result


def side_spec(side: str, w: Workload, prepared: dict, *, args, total_steps: int, workdir: Path, name: str) -> dict:
    return {"side": side, "workload": w.settings(), "overrides": prepared["overrides"], "checkpoint": prepared["checkpoint"],
            "baseline_rows": prepared["baseline_rows"], "steps": total_steps, "warmup": args.warmup,
            "optimiser_steps": optimiser_steps(w, total_steps), "optim": OPTIM, "seed": args.seed,
            "trainer": args.trainer, "run_dir": str(workdir / "runs" / name), "result_path": str(workdir / f"{name}.json")}


# -- report -----------------------------------------------------------------------------------------
def _median(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"] if results else "not run"}
    keys = {k for r in ok for k, v in r.items() if isinstance(v, (int, float))}
    return {k: statistics.median(r[k] for r in ok if k in r) for k in sorted(keys)}


def add_mfu(median: dict, *, params: int, flops_per_param_token: int | None, peak_tflops: float | None) -> None:
    """Model FLOPs utilisation of one side: its model FLOPs per second over the device's peak."""
    from llm_stages.training.perf import mfu

    if peak_tflops and flops_per_param_token and "tokens_per_s" in median:
        median["mfu"] = mfu(params, median["tokens_per_s"], peak_tflops, flops_per_param_token)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    gpu = meta["trainer"] == "gpu"
    mfu = bool(meta.get("peak_tflops"))
    lines = [f"# llm_stages vs TRL {meta['versions'].get('trl')} — {meta['model']}, {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}; {meta['warmup']} warm-up steps, then the timed steps "
             f"(per workload below); median of {meta['repeats']} run(s) per side, each in its own process.", "",
             "| workload | side | timed steps | tokens/step | steps/s | samples/s | tokens/s | rollout tok/s | update tok/s "
             "| peak RSS (MB) |" + (" CUDA max alloc (MB) |" if gpu else "") + (" MFU |" if mfu else "")
             + " process wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "") + ("---|" if mfu else "") + "---|"]
    for name, entry in report["workloads"].items():
        baseline = entry["baseline"]
        for side in ("ours", baseline):
            m = entry["sides"][side]["median"]
            if "error" in m:
                lines.append(f"| {name} | {side} | failed |" + " |" * (8 + gpu + mfu))
                continue
            cells = [m.get("timed_steps"), m.get("tokens_per_step"), m.get("steps_per_s"), m.get("samples_per_s"), m.get("tokens_per_s"),
                     m.get("rollout_tokens_per_s"), m.get("update_tokens_per_s"), m.get("peak_rss_mb")]
            cells += [m.get("cuda_max_allocated_mb")] if gpu else []
            cells += [f"{m['mfu']:.1%}" if "mfu" in m else None] if mfu else []
            cells += [m.get("wall_s")]
            lines.append(f"| {name} | {side} | " + " | ".join(_fmt(c) for c in cells) + " |")
        r = entry["ratio"]
        cells = [None, None, r.get("steps_per_s"), r.get("samples_per_s"), r.get("tokens_per_s"), r.get("rollout_tokens_per_s"),
                 r.get("update_tokens_per_s"), r.get("peak_rss_mb")] + ([r.get("cuda_max_allocated_mb")] if gpu else []) \
            + ([None] if mfu else []) + [None]
        lines.append(f"| {name} | **ours/{baseline}** | " + " | ".join(
            "–" if c is None else f"**{c:.2f}×**" for c in cells) + " |")
    lines += ["", "Rates: > 1× means ours is faster; memory: < 1× means ours uses less. samples = conversations (SFT, "
              "packed or not), pairs (RM, DPO), replies (GRPO, PPO); tokens = real (non-padding) tokens of the step's "
              "batch (RL: prompt + generated tokens of the rollout). rollout tok/s = generated tokens / generation "
              "time; update tok/s = tokens through the policy update / update time. Baselines: TRL 1.16 trainers; "
              "for PPO a naive loop (bench/naive_ppo.py: no KV cache, one sequence at a time)."
              + (f" MFU: model FLOPs (6 x {meta['parameters'] / 1e6:.1f}M parameters x real tokens/s; 8 x with DPO's "
                 f"reference copy) / the {meta['peak_tflops']:g} TFLOP/s peak; attention and padding not counted."
                 if mfu else ""), ""]
    notes = [f"- {name}: {n}" for name, entry in report["workloads"].items()
             for n in ([entry["settings"]["caveat"]] if entry["settings"]["caveat"] else []) + entry["notes"]]
    if notes:
        lines += ["Notes:", *notes, ""]
    return "\n".join(lines)


def _compare_backends(entries: dict) -> None:
    """Where both GRPO rows ran: our vLLM backend against our HF one, noted under grpo_vllm."""
    if "grpo" in entries and "grpo_vllm" in entries:
        hf, vllm = (entries[n]["sides"]["ours"]["median"] for n in ("grpo", "grpo_vllm"))
        ratios = {k: vllm[k] / hf[k] for k in ("samples_per_s", "rollout_tokens_per_s") if vllm.get(k) and hf.get(k)}
        entries["grpo_vllm"]["ratio_to_hf_backend"] = ratios
        if ratios:
            entries["grpo_vllm"]["notes"].append("ours with vLLM / ours with HF generate (the grpo row): " + ", ".join(
                f"{k.replace('_per_s', '/s').replace('_', ' ')} {v:.2f}×" for k, v in ratios.items()))


def _meta(args, device: str) -> dict:
    import lightning
    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (+ uncommitted changes)"
    return {"date": datetime.date.today().isoformat(), "model": args.model, "trainer": args.trainer, "device": device,
            "warmup": args.warmup, "repeats": args.repeats, "steps": args.steps, "seed": args.seed, "commit": commit,
            "argv": sys.argv[1:], "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "lightning": lightning.__version__, "trl": trl_version}}


def _gpu_peak_tflops() -> float | None:
    import torch

    from llm_stages.training.perf import peak_tflops

    return peak_tflops(torch.cuda.get_device_name(0))


def _device(trainer: str) -> str:
    if trainer == "gpu":
        import torch

        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPU threads"


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.prepare import (count_parameters, demo_problems, prepare_workload, save_checkpoints,
                               write_long_prompt_pairs)
    from llm_stages.data.demo import write_demo_data

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = f"{date}-{args.model}" + ("-gpu" if args.trainer == "gpu" else "")
    if not args.profile and set(args.workloads) != set(DEFAULT_WORKLOADS):
        stem += "-" + "+".join(args.workloads)  # a partial run never overwrites a full one
    stem += "".join(f"-{flag}{v}" for flag, v in (("b", args.batch_size), ("t", args.max_length)) if v is not None)
    resized = {k: v for k, v in (("batch_size", args.batch_size), ("max_length", args.max_length)) if v is not None}
    workloads = [dataclasses.replace(WORKLOADS[n], **resized) for n in args.workloads]
    timed = {w.name: args.steps or (min(w.steps, 3) if args.profile else w.steps) for w in workloads}

    with tempfile.TemporaryDirectory(prefix="llm_stages_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"preparing {args.model} checkpoint and data in {workdir}", flush=True)
        checkpoints = save_checkpoints(args.model, workdir / "model", args.seed)
        parameters = count_parameters(checkpoints["causal"])
        problems = demo_problems(workloads, {name: args.warmup + steps for name, steps in timed.items()}, n_val=8)
        demo = write_demo_data(workdir / "demo", seed=0, n_train=problems, n_val=8)
        if any(w.data == "pref_long" for w in workloads):
            demo["pref_long"] = write_long_prompt_pairs(demo["pref_train"], workdir / "demo" / "pref_long.jsonl")
        prepared = {w.name: prepare_workload(w, demo=demo, checkpoints=checkpoints, workdir=workdir,
                                             total_steps=args.warmup + timed[w.name], trainer=args.trainer, seed=args.seed)
                    for w in workloads}

        if args.profile:
            w = workloads[0]
            prefix = out_dir / f"{stem}-profile-{w.name}"
            spec = side_spec("ours", w, prepared[w.name], args=args, total_steps=args.warmup + timed[w.name],
                             workdir=workdir, name=f"profile-{w.name}")
            spec["profile"] = {"prefix": str(prefix), "wait": args.warmup, "active": timed[w.name]}
            result = run_child(spec, workdir, f"profile-{w.name}")
            if "error" in result:
                return 1
            print(f"\nprofile of our {w.name} ({timed[w.name]} steps after {args.warmup} warm-up): "
                  f"{prefix}.trace.json (chrome://tracing, ui.perfetto.dev), {prefix}.txt (key_averages by self CPU time)")
            return 0

        results: dict[str, dict[str, list]] = {w.name: {"ours": [], w.baseline: []} for w in workloads}
        for repeat in range(args.repeats):
            for w in workloads:
                # Alternate which side goes first, so a slow drift of the machine does not favour one side.
                sides = ["ours", w.baseline] if repeat % 2 == 0 else [w.baseline, "ours"]
                for side in sides:
                    name = f"{w.name}-{side}-{repeat}"
                    print(f"[repeat {repeat + 1}/{args.repeats}] {w.name}: {side} ...", flush=True)
                    spec = side_spec(side, w, prepared[w.name], args=args, total_steps=args.warmup + timed[w.name],
                                     workdir=workdir, name=name)
                    result = run_child(spec, workdir, name)
                    if "error" not in result:
                        print(f"    {result['steps_per_s']:.3g} steps/s, {result['tokens_per_s']:.4g} tokens/s, "
                              f"peak RSS {result['peak_rss_mb']:.0f} MB, process {result['wall_s']:.1f}s", flush=True)
                        if result["steps_recorded"] != args.warmup + timed[w.name]:
                            prepared[w.name]["notes"].append(f"{side} recorded {result['steps_recorded']} steps, "
                                                             f"expected {args.warmup + timed[w.name]}")
                    results[w.name][side].append(result)

    peak = args.peak_tflops or (_gpu_peak_tflops() if args.trainer == "gpu" else None)
    report = {"meta": {**_meta(args, _device(args.trainer)), "timed_steps": timed, "parameters": parameters,
                       "peak_tflops": peak, "resized": resized}, "workloads": {}}
    failed = False
    for w in workloads:
        entry = {"stage": w.stage, "baseline": w.baseline, "settings": w.settings(), "records": prepared[w.name]["records"],
                 "notes": prepared[w.name]["notes"], "our_overrides": prepared[w.name]["overrides"], "sides": {}}
        for side, runs in results[w.name].items():
            entry["sides"][side] = {"median": _median(runs), "repeats": runs}
            add_mfu(entry["sides"][side]["median"], params=parameters, flops_per_param_token=w.flops_per_param_token,
                    peak_tflops=peak)
            failed |= "error" in entry["sides"][side]["median"] or any("error" in r for r in runs)
        ours, base = entry["sides"]["ours"]["median"], entry["sides"][w.baseline]["median"]
        entry["ratio"] = {k: ours[k] / base[k] for k in RATIO_KEYS if ours.get(k) and base.get(k)}
        report["workloads"][w.name] = entry
    _compare_backends(report["workloads"])
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    md_path.write_text(table)
    print("\n" + table)
    print(f"written: {json_path}, {md_path}")
    return 1 if failed else 0
