"""Reference log-probs for the stages trained against a frozen reference (DPO, KTO), `module.ref=`:

- `precompute` (default): one pass of the initial policy over the train and validation examples
  before the first update, cached per example (and saved in checkpoints with a fingerprint of the
  examples' tokens, so a resume on changed data or tokenization is refused rather than trained
  against another example's log-probs). No second model is held during training; since the
  reference *is* the initial policy, nothing else needs loading.
- `copy`: a frozen copy of the initial policy (the stage's `reference`), run next to it at every
  step; under LoRA/QLoRA the policy with its adapter switched off, so no copy is held either.

A batch holds two rows per example — chosen then rejected (DPO), or completion then KL row (KTO) —
and `index` (examples,), its examples' positions in their split; the stage's
`score(model, batch)` returns the summed reply log-probs of all rows first. The DataModule gives
`reference_batches(split)` (every example in index order) and `fingerprint()`.
"""

from __future__ import annotations

import torch

from llm_stages.adapters import reference_of
from llm_stages.errors import ConfigError

REF_MODES = ("precompute", "copy")


class ReferenceLogps:
    """Where a stage's reference log-probs come from; call it with (stage, batch)."""

    def __init__(self, mode: str):
        if mode not in REF_MODES:
            raise ConfigError(f"module.ref must be 'precompute' or 'copy', got {mode!r}")
        self.mode = mode
        self.cache: dict[str, torch.Tensor] = {}  # split -> (examples, 2) for ref=precompute
        self.fingerprint: str | None = None  # of the examples they were computed on

    def __call__(self, stage, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's summed log-probs of the batch's first and second rows, each (examples,)."""
        if self.mode == "copy":
            with torch.no_grad(), reference_of(stage.model, stage.reference) as reference:
                return _halves(stage.score(reference, batch)[0], batch)
        if not self.cache:
            self.precompute(stage)
        cached = self.cache["train" if stage.training else "val"][batch.index.cpu()].to(stage.device)
        return cached[:, 0], cached[:, 1]

    @torch.no_grad()
    def precompute(self, stage) -> None:
        """Score every example once with the policy as it is now (before any update, it is the reference)."""
        datamodule, was_training = stage.trainer.datamodule, stage.model.training
        stage.model.eval()
        for split in ("train", "val"):
            chunks = []
            for batch in datamodule.reference_batches(split):
                batch = stage.transfer_batch_to_device(batch, stage.device, 0)
                chunks.append(torch.stack(_halves(stage.score(stage.model, batch)[0], batch), 1).cpu())
            self.cache[split] = torch.cat(chunks) if chunks else torch.zeros(0, 2)
        self.fingerprint = datamodule.fingerprint()
        stage.model.train(was_training)

    def save(self, checkpoint: dict) -> None:
        checkpoint["reference_logps"] = self.cache  # a resumed run must not re-score with a trained policy
        checkpoint["reference_fingerprint"] = self.fingerprint

    def load(self, checkpoint: dict, datamodule) -> None:
        self.cache = checkpoint.get("reference_logps", {})
        self.fingerprint = checkpoint.get("reference_fingerprint")
        if self.cache and self.fingerprint is not None:
            current = datamodule.fingerprint()
            if current != self.fingerprint:
                raise ConfigError(f"the checkpoint's cached reference log-probs (module.ref=precompute) belong to other "
                                  f"data or tokenization (fingerprint {self.fingerprint} != {current} now): "
                                  "resume with the data and tokenizer settings it was trained on, or start a new run")


def _halves(logps: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    n = batch.index.shape[0]
    return logps[:n], logps[n:]
