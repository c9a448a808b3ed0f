"""Hugging Face exports during training, so an intermediate model is usable without Lightning."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

from llm_stages.adapters import exportable
from llm_stages.training.export import export_hf


class ExportHF(L.Callback):
    """Every `every_n_steps` optimiser steps, `save_pretrained` every model the stage exports
    (`pl_module.exports()`: the policy; PPO's critic with export_critic) and the tokenizer into
    `<dirpath>/step_<N>/<name>`, atomically; only the newest `keep` are kept (null: all). The final
    export at the end of a run is `<run dir>/export`, written by train() whatever the callbacks."""

    def __init__(self, dirpath: str, every_n_steps: int | None = None, keep: int | None = 2, merge_lora: bool = True):
        self.dirpath, self.every_n_steps, self.keep, self.merge_lora = Path(dirpath), every_n_steps, keep, merge_lora
        self._last_step = 0
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # RL stages take several optimiser steps per batch: export once a multiple has been passed.
        if not self.every_n_steps or trainer.global_step // self.every_n_steps == self._last_step // self.every_n_steps:
            return
        self._last_step = trainer.global_step
        step_dir = self.dirpath / f"step_{trainer.global_step:06d}"
        for name, model in pl_module.exports().items():  # every rank: sharded weights are gathered from all
            export_hf(exportable(model, self.merge_lora), pl_module.tokenizer, step_dir / name)
        if trainer.is_global_zero:
            self.written.append(step_dir)
            while self.keep and len(self.written) > self.keep:
                shutil.rmtree(self.written.pop(0), ignore_errors=True)
        trainer.strategy.barrier()
