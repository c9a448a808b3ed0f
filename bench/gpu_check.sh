#!/usr/bin/env bash
# A GPU machine checked in one command (bench/gpu_check.py): every stage for 20 steps on
# qwen_0_5b_init with trainer=gpu, fsdp2 on one device, QLoRA, DeepSpeed ZeRO-2, the MFU of packed
# SFT at 16 x 2048, GRPO through vLLM when .venv-vllm exists; one table, within 8 minutes.
#   bash bench/gpu_check.sh              # on a GPU machine
#   bash bench/gpu_check.sh --dry-run    # on CPU: every config checked, the CPU-possible rows run
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_START=${GPU_CHECK_START:-$(date +%s)}   # the rows' time budget counts from here
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# DeepSpeed for the trainer=deepspeed row: not a dependency (CUDA-only); the newest release, pinned.
DEEPSPEED_VERSION=0.19.8
if [[ " $* " != *" --dry-run "* ]] && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  echo "installing deepspeed==$DEEPSPEED_VERSION (DS_BUILD_OPS=0: ops compiled on first use)" >&2
  DS_BUILD_OPS=0 timeout 180 "$PY" -m pip install -q "deepspeed==$DEEPSPEED_VERSION" >&2 \
    || echo "deepspeed==$DEEPSPEED_VERSION not installed: its row will say so" >&2
fi
exec "$PY" -m bench.gpu_check "$@"
