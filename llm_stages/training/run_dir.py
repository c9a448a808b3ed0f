"""What a run keeps in its directory, so that a killed run loses nothing and leaves nothing behind:
files written atomically (a temporary sibling, then a rename), what a killed writer left cleaned at
the next start, and the checkpoint a resumed run continues from."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from llm_stages.errors import ConfigError
from llm_stages.training.launch import launch_rank

log = logging.getLogger(__name__)

# `.export.tmp-1234`, `.last.ckpt.tmp-1234`: a write in progress by process 1234 (see temporary_sibling).
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


def temporary_sibling(target: Path, kind: str = "tmp") -> Path:
    """Where to write `target` before renaming it into place: beside it, so on the same filesystem
    (a rename across filesystems is a copy, and not atomic), named after the writing process so a
    later start can tell a dead writer's leftovers from a live one's."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what a killed writer left under `run_dir` (a half-written export or checkpoint):
    temporary siblings whose process is gone. Returns what was removed. Only global rank 0 cleans:
    the writers are rank 0's processes, and another machine cannot tell whether they are alive."""
    removed = []
    if launch_rank() != "0":
        return removed
    root = Path(run_dir)
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(".*")):
        match = TEMPORARY.match(path.name)
        if not match or _alive(int(match.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d leftovers of an interrupted write: %s", len(removed), ", ".join(str(p) for p in removed))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        # Not written by this process yet (cleaning runs first): a previous life of a container whose
        # processes get the same ids on every start.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, written to a temporary file beside the target, flushed to disk,
    then renamed over it: a kill at any moment leaves the previous checkpoint or the new one, whole.
    (Lightning's own writer stages the file in $TMPDIR, which is atomic only when $TMPDIR happens to
    be on the run dir's filesystem.) Remote paths (s3://...) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest state in a checkpoint directory (see checkpoints_newest_first), readable or not."""
    found = checkpoints_newest_first(checkpoints)
    return found[0] if found else None


def checkpoints_newest_first(checkpoints: Path) -> list[Path]:
    """The checkpoints in a checkpoint directory, the most recently written first, `last.ckpt` first
    on a tie (it is written right after the best-so-far one of the same step). A checkpoint is a
    file, or under sharded strategies (fsdp2, deepspeed) a directory of shards named the same way."""
    return sorted(checkpoints.glob("*.ckpt"), key=lambda p: (_written_at(p), p.name == "last.ckpt"), reverse=True)


def _written_at(path: Path) -> int:
    """When a checkpoint was written: a file's mtime; a sharded checkpoint directory's newest file's."""
    files = [path, *path.rglob("*")] if path.is_dir() else [path]
    return max(f.stat().st_mtime_ns for f in files)


def _load_structure(path: Path, weights_only: bool):
    # mmap: the tensors stay on disk, so reading a checkpoint's structure costs little at any size.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (a truncated or foreign file), or None when it can. A
    sharded checkpoint (a directory) is taken as it is when it holds any file."""
    if path.is_dir():
        return None if any(p.is_file() for p in path.rglob("*")) else "an empty directory"
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "an empty file"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the very end
        return "truncated? not a whole torch.save archive"
    try:
        state = _load_structure(path, weights_only=True)
    except pickle.UnpicklingError:
        return None  # readable, holding more than tensors (see loads_weights_only)
    except Exception as e:  # noqa: BLE001 - a damaged archive fails in many ways; all mean the same here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "a torch file, not a Lightning checkpoint: no state_dict in it"
    return None


def loads_weights_only(path: str | os.PathLike) -> bool | None:
    """Whether a checkpoint file loads with torch.load(weights_only=True) (tensors and plain values
    only, no code run while unpickling), so the resume can insist on it; None for a sharded
    directory (its strategy loads it)."""
    path = Path(path)
    if path.is_dir():
        return None
    try:
        _load_structure(path, weights_only=True)
    except pickle.UnpicklingError:
        log.info("resume: %s holds objects beyond tensors and plain values; loading it in full", path.name)
        return False
    return True


def _first_readable(checkpoints: Path, key: str) -> Path | None:
    """The newest checkpoint in `checkpoints` that can be resumed from; says so in one line when the
    newest cannot, and refuses in one line when none can."""
    found = checkpoints_newest_first(checkpoints)
    problems = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("resume: %s is unreadable (%s); resuming from %s instead",
                            found[0].name, problems[0], path.name)
            return path
        problems.append(problem)
    if found:
        listed = "; ".join(f"{p.name}: {why}" for p, why in zip(found, problems))
        raise ConfigError(f"{key}: no readable checkpoint in {checkpoints} ({listed}); pass ckpt_path=<a good "
                          f"checkpoint>, or move the directory away to start fresh")
    return None


def resolve_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume: `ckpt_path` (a path, or `last`: the newest state in this run dir),
    else with `resume=auto` the newest state in this run dir, else None (a fresh start). `last` and
    `resume=auto` name the same checkpoint; they differ only when there is none (an error, a fresh start).
    The newest state is the newest readable one: a checkpoint cut short by a full disk or a killed
    copy is passed over, with a line saying so."""
    checkpoints = Path(str(cfg.paths.output_dir)) / "checkpoints"
    ckpt = cfg.get("ckpt_path")
    if ckpt:
        path = _first_readable(checkpoints, "ckpt_path=last") if ckpt == "last" else Path(str(ckpt))
        if path is None or not path.exists():
            raise ConfigError(f"ckpt_path={ckpt}: no checkpoint at {path or checkpoints / 'last.ckpt'}" +
                              (" (set hydra.run.dir to the run to resume)" if ckpt == "last" else ""))
        problem = checkpoint_problem(path)
        if problem:
            raise ConfigError(f"ckpt_path={ckpt}: cannot resume from {path} ({problem}); pass a checkpoint a run "
                              f"wrote (<run dir>/checkpoints/*.ckpt), or ckpt_path=last")
        return str(path)
    if cfg.get("resume") not in (None, "auto"):
        raise ConfigError(f"resume={cfg.resume}: expected auto or null")
    if cfg.get("resume") == "auto":
        found = _first_readable(checkpoints, "resume=auto")
        if found:
            log.info("resume=auto: resuming from %s", found)
            return str(found)
        log.info("resume=auto: no checkpoint in %s, starting fresh", checkpoints)
    return None
