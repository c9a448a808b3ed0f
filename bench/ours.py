"""Our side of a comparison, run in a child process: `train(compose(overrides))` with a step clock.

Nothing in llm_stages is changed for the benchmark: the clock is a Lightning callback added to the
config, and for RL stages it wraps the module's `sample` to count prompt and generated tokens.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from bench.clock import StepClock


def _real_tokens(micro_batch) -> int:
    return int(micro_batch.num_tokens)  # CausalBatch / PairBatch: non-padding tokens (packed rows: their 2-D mask)


def _samples(micro_batch) -> int:
    """Conversations (packed rows hold several: one per position restart), pairs, or sequences."""
    if hasattr(micro_batch, "num_pairs"):
        return micro_batch.num_pairs
    if getattr(micro_batch, "position_ids", None) is not None:  # packed: each example's positions restart at 0
        return int(((micro_batch.position_ids == 0) & micro_batch.real_tokens.bool()).sum())
    return int(micro_batch.input_ids.shape[0])


class LightningClock(L.Callback):
    """Times every training step (one optimiser step; for RL stages one iteration) and counts what it
    processed; writes the record to `path` when training ends."""

    def __init__(self, path: str):
        self.path, self.clock = path, StepClock()
        self._rollout: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if hasattr(pl_module, "generation_seconds"):  # an RL stage: count what its sampler returns during training
            sampler = pl_module.rollout.sampler
            original = sampler.sample

            def sample(*args, **kwargs):
                out = original(*args, **kwargs)
                if pl_module.training:
                    self._rollout = {"prompt_tokens": int(out.query_mask.sum()), "generated_tokens": int(out.response_mask.sum()),
                                     "rows": int(out.query.shape[0])}
                return out

            sampler.sample = sample

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.begin()
        micro_batches = batch if isinstance(batch, list) else [batch]
        if all(hasattr(mb, "num_tokens") for mb in micro_batches):
            self.clock.add(tokens=sum(map(_real_tokens, micro_batches)), samples=sum(map(_samples, micro_batches)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step is over when its kernels are, not when they are queued
        if self._rollout is not None:
            r, self._rollout = self._rollout, None
            tokens = r["prompt_tokens"] + r["generated_tokens"]
            self.clock.add(tokens=tokens, samples=r["rows"], generated_tokens=r["generated_tokens"],
                           generation_seconds=pl_module.generation_seconds, update_seconds=pl_module.update_seconds,
                           update_tokens=tokens * pl_module.ppo_epochs)
        self.clock.end()

    def on_train_end(self, trainer, pl_module) -> None:
        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        self.clock.dump(self.path, cuda_max_allocated_mb=cuda)


class TorchProfile(L.Callback):
    """torch.profiler over training steps `wait + 1 .. wait + active` (the steps before are warm-up);
    writes a chrome trace and the key_averages table (sorted by self CPU time) as `<prefix>.trace.json`
    and `<prefix>.txt`."""

    def __init__(self, prefix: str, wait: int, active: int):
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prefix = prefix
        # The profiler's own warm-up step (recorded, then discarded) is the last of the run's warm-up steps.
        self.profiler = profile(activities=activities, record_shapes=True,
                                schedule=schedule(wait=max(wait - 1, 0), warmup=min(wait, 1), active=active),
                                on_trace_ready=self._write)

    def _write(self, prof) -> None:
        prof.export_chrome_trace(f"{self.prefix}.trace.json")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
        Path(f"{self.prefix}.txt").write_text(table + "\n")
        print(table)

    def on_train_start(self, trainer, pl_module) -> None:
        self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.profiler.step()

    def on_train_end(self, trainer, pl_module) -> None:
        self.profiler.__exit__(None, None, None)


def run(spec: dict) -> None:
    from omegaconf import open_dict

    from llm_stages.config import compose
    from llm_stages.train import train

    cfg = compose(spec["overrides"], output_dir=spec["run_dir"])
    with open_dict(cfg):
        callbacks = dict(cfg.get("callbacks") or {})
        callbacks["bench_clock"] = {"_target_": "bench.ours.LightningClock", "path": spec["result_path"]}
        if spec.get("profile"):
            callbacks["bench_profile"] = {"_target_": "bench.ours.TorchProfile", "prefix": spec["profile"]["prefix"],
                                          "wait": spec["profile"]["wait"], "active": spec["profile"]["active"]}
        cfg.callbacks = callbacks
    train(cfg)
