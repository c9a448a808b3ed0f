"""Peak memory of DPO with ref=precompute vs ref=copy, and their first-step losses.

    python -m bench.dpo_reference_memory [--model smollm2] [--steps 2] [--batch-size 2]

Each mode runs in its own process (so peak RSS is its own), one optimiser step at a time on the
demo preference pairs; prints peak RSS, seconds and the first step's loss for each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from llm_stages.data.demo import write_demo_data

CHILD = """
import json, sys
from llm_stages.config import compose
from llm_stages.train import train
m = train(compose(sys.argv[2:], output_dir=sys.argv[1]))
print("RESULT " + json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}))
"""


def run(mode: str, args, workdir: str) -> dict:
    # A small slice of the demo pairs keeps the precompute pass short; the memory gap does not depend on it.
    paths = write_demo_data(f"{workdir}/data", n_train=args.pairs, n_val=8)
    overrides = [f"stage=dpo", f"model={args.model}", "data=file", f"data.path={paths['pref_train']}", f"module.ref={mode}", f"trainer.max_steps={args.steps}",
                 f"datamodule.batch_size={args.batch_size}", "datamodule.max_length=128", "datamodule.max_prompt_length=64", "logger=none",
                 "callbacks=none", "export.enabled=false", "validate_before_fit=false", "trainer.limit_val_batches=0",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"paths.log_dir={workdir}/runs",
                 "optim.max_grad_norm=null"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, f"{workdir}/{mode}", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{mode} failed:\n{out[-2000:]}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {"mode": mode, "peak_rss_mb": usage.ru_maxrss / 1024, "fit_seconds": result["fit_seconds"],
            "train/loss (last step)": result["train/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32, help="training pairs (the precompute pass scores them all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run(mode, args, workdir) for mode in ("precompute", "copy")]
    for row in rows:
        print(json.dumps(row))
    print(f"peak RSS precompute / copy = {rows[0]['peak_rss_mb'] / rows[1]['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
