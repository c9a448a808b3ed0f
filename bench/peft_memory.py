"""Full fine-tuning vs LoRA vs QLoRA: seconds per optimiser step and peak memory, for SFT and DPO.

    python -m bench.peft_memory [--model smollm2] [--steps 6] [--batch-size 4] [--max-length 256]

Each (stage, method) runs in its own process, so its peak RSS (CUDA max allocated with
--trainer gpu) is its own. The first step (allocator and kernel warm-up) is left out of the
median s/step. Prints one JSON line per run and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import lightning as L

from llm_stages.data.demo import write_demo_data

METHODS = {"full": [], "lora": ["peft=lora"], "qlora": ["peft=qlora"]}


class StepTimer(L.Callback):
    """Wall time of every training step, written as JSON to `path` at the end."""

    def __init__(self, path: str):
        self.path, self.times, self._last = path, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._last)

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        trainable = sum(p.numel() for p in pl_module.trainable().parameters() if p.requires_grad)
        with open(self.path, "w") as f:
            json.dump({"step_seconds": self.times, "cuda_max_allocated_mb": cuda, "trainable_params": trainable}, f)


CHILD = """
import sys
from llm_stages.config import compose
from llm_stages.train import train
train(compose(sys.argv[2:], output_dir=sys.argv[1]))
"""


def run(stage: str, method: str, args, workdir: str, paths: dict) -> dict:
    out = f"{workdir}/{stage}-{method}"
    data = paths["sft_train"] if stage == "sft" else paths["pref_train"]
    overrides = [f"stage={stage}", f"model={args.model}", *METHODS[method], "data=file", f"data.path={data}",
                 f"trainer.max_steps={args.steps}", f"trainer={args.trainer}", f"datamodule.batch_size={args.batch_size}",
                 f"datamodule.max_length={args.max_length}", "logger=none", "callbacks=none", "export.enabled=false",
                 "validate_before_fit=false", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", f"paths.log_dir={workdir}/runs",
                 f"+callbacks.timer={{_target_: bench.peft_memory.StepTimer, path: {out}.json}}"]
    if stage != "sft":  # pairs: prompts take at most half of max_length
        overrides.append(f"datamodule.max_prompt_length={args.max_length // 2}")
    if stage == "dpo":
        overrides.append("module.ref=copy")  # the reference as a model: a full copy, or the disabled adapter
    proc = subprocess.Popen([sys.executable, "-c", CHILD, out, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{stage} {method} failed:\n{log[-3000:]}")
    with open(f"{out}.json") as f:
        timed = json.load(f)
    steps = timed["step_seconds"][1:] or timed["step_seconds"]
    row = {"stage": stage, "method": method, "s_per_step": round(statistics.median(steps), 3),
           "peak_rss_mb": round(usage.ru_maxrss / 1024), "trainable_params_m": round(timed["trainable_params"] / 1e6, 2)}
    if timed["cuda_max_allocated_mb"] is not None:
        row["cuda_max_allocated_mb"] = round(timed["cuda_max_allocated_mb"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--trainer", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--stages", default="sft,dpo")
    parser.add_argument("--methods", default="full,lora,qlora")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        paths = write_demo_data(f"{workdir}/data", n_train=256, n_val=8)
        for stage in args.stages.split(","):
            for method in args.methods.split(","):
                rows.append(run(stage, method, args, workdir, paths))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, trainer={args.trainer}, batch {args.batch_size}, max_length {args.max_length}, "
          f"median of steps 2..{args.steps}\n")
    print("| stage | method | trainable params (M) | s/step | peak RSS (MB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['method']} | {r['trainable_params_m']} | {r['s_per_step']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
