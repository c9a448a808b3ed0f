"""Entry point of one benchmark process: `python -m bench.child SPEC.json`.

The spec names the side ("ours", "trl" or "naive"); only that side's module is imported, so a child's
peak RSS holds its own libraries and nothing of the other side's.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Offline and quiet, the same for every side: no hub calls, telemetry, W&B runs or progress bars.
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    side = spec["side"]
    if side == "ours":
        from bench.ours import run
    elif side == "trl":
        from bench.trl_side import run
    elif side == "naive":
        from bench.naive_ppo import run
    else:
        raise SystemExit(f"unknown side {side!r}")
    run(spec)


if __name__ == "__main__":
    main()
