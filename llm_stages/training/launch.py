"""Which process of a multi-process launch this is, read from the environment alone: no torch or
Lightning import, so the Hydra config (its log file name) can use it before anything heavy loads."""

from __future__ import annotations

import os


def launch_rank() -> str:
    """This process's rank in a multi-process launch, read from what launched it, before
    torch.distributed starts: torchrun's RANK, srun's SLURM_PROCID, else Lightning's NODE_RANK and
    LOCAL_RANK (`"1.0"`: node 1, its first process). `"0"` for global rank 0 and for a lone process."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return str(int(os.environ[var]))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return "0" if node == local == 0 else f"{node}.{local}"


def log_file_suffix(job_name: str = "") -> str:
    """The Hydra log file's suffix (conf/hydra/default.yaml): none for global rank 0, `_rank<r>` for
    the others, so processes on several machines never append to one file on a shared filesystem.
    None either for the processes Lightning starts itself (trainer=ddp on one machine): their job
    name, `train_ddp_process_<local rank>`, already names a file of their own."""
    rank = launch_rank()
    return "" if rank == "0" or job_name.startswith("train_ddp_process_") else f"_rank{rank}"
