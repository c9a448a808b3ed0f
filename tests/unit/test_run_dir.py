"""Checkpoint files are written beside their target and renamed into place; the newest state wins."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from llm_stages.training import run_dir
from llm_stages.training.run_dir import AtomicCheckpointIO, newest_checkpoint, remove_stale_temporaries


def test_a_checkpoint_is_written_beside_its_target_then_renamed(tmp_path, monkeypatch):
    elsewhere = tmp_path / "tmpdir"  # $TMPDIR, possibly another filesystem: never used
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    renames = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), replace(src, dst)))
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.arange(4.0)}, target)
    assert renames == [(target.with_name(f".last.ckpt.tmp-{os.getpid()}"), target)]
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_an_interrupted_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4}, target)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_dir.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 8}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_last_ckpt_wins_a_tie_and_stale_temporaries_of_dead_writers_go(tmp_path):
    best, last = tmp_path / "step000010.ckpt", tmp_path / "last.ckpt"
    for path in (best, last):
        path.write_bytes(b"")
        os.utime(path, ns=(10**18, 10**18))
    assert newest_checkpoint(tmp_path) == last
    os.utime(best, ns=(2 * 10**18, 2 * 10**18))
    assert newest_checkpoint(tmp_path) == best

    own = tmp_path / f".export.tmp-{os.getpid()}"  # a previous life of a process with this pid (containers)
    live = tmp_path / f".export.tmp-{os.getppid()}"
    own.mkdir()
    live.mkdir()
    assert remove_stale_temporaries(tmp_path) == [own] and live.exists()
