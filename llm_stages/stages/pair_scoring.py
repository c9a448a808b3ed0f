"""What RM and DPO read off a batch of pairs, for either layout: one row per sequence (`PairBatch`)
or the prompt forwarded once per pair (`SharedPairBatch`, llm_stages.data.kinds.shared_pair). Both
return per-sequence values in the same order, chosen sequences first, then rejected, so the stages'
losses, reference caches and reports never ask which layout ran."""

from __future__ import annotations

import torch

from llm_stages.training import strategies
from llm_stages.data.kinds.pair import PairBatch
from llm_stages.data.kinds.shared_pair import SharedPairBatch
from llm_stages.losses.causal import IGNORE_INDEX, labelled_outputs, sequence_logps
from llm_stages.losses.chunked import head_outputs

# Attention implementations that honour a custom 4-D mask (flash-attention kernels only take
# position_ids / cu_seqlens, which cannot say "rejected does not see chosen").
MASKED_ATTENTION = ("sdpa", "eager")


def _hf_model(model):
    """The transformers model under a peft wrapper (adapters stay active: they are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shared_prompt_unsupported(model, *, reward_head: bool, sharded: bool) -> str | None:
    """Why `model` cannot score shared-prompt rows, or None when it can."""
    hf = _hf_model(model)
    implementation = getattr(hf.config, "_attn_implementation", None) or "eager"
    if implementation not in MASKED_ATTENTION:
        return f"attention '{implementation}' ignores 4-D attention masks (sdpa and eager take them)"
    if reward_head:
        if not hasattr(hf, "score") or not hasattr(hf, hf.base_model_prefix):
            return f"{type(hf).__name__} has no `score` head on a `{hf.base_model_prefix}` body to read rewards at"
        if sharded:
            return "a sharded reward model's score head is only run inside its own forward"
    return None


def check_shared_prompts(stage, *, reward_head: bool) -> None:
    """Called from the stage's `setup` (after the DataModule's): where the data shares prompts but
    the model cannot score that layout, the DataModule goes back to one row per sequence (logged),
    or refuses in one line when `datamodule.share_prompt=true` asked for it."""
    datamodule = getattr(stage.trainer, "datamodule", None)
    if not getattr(datamodule, "shares_prompt", False):
        return
    sharded = type(strategies.for_strategy(stage.trainer.strategy)) is not strategies.Replicated
    why = shared_prompt_unsupported(stage.model, reward_head=reward_head, sharded=sharded)
    if why:
        datamodule.stop_sharing(why)


def model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """The boolean 4-D mask as the attention implementation takes it: sdpa a boolean one, eager an
    additive float one (it adds the mask to the scores)."""
    hf = _hf_model(model)
    if getattr(hf.config, "_attn_implementation", None) == "sdpa":
        return mask
    dtype = next(hf.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def scores_at(model, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor,
              columns: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False):
    """TokenScores of `labels` (n,), each predicted by the output at (`rows`, `columns`) of rows laid out
    with the boolean 4-D `mask` (shared pairs, shared prompts); columns before the first of them never
    reach the LM head."""
    start = int(columns.min()) if columns.numel() else 0
    outputs = head_outputs(model, input_ids.shape[1] - start, input_ids=input_ids, attention_mask=model_mask(model, mask),
                           position_ids=position_ids)
    return outputs[rows, columns - start].scores(labels, temperature=temperature, with_entropy=with_entropy)


def sequence_scores(model, batch: PairBatch | SharedPairBatch):
    """(summed reply log-probs, reply token counts, mean reply logits), each (2 * pairs,)."""
    if isinstance(batch, PairBatch):
        outputs, labels = labelled_outputs(model, batch.labels, input_ids=batch.input_ids,
                                          attention_mask=batch.attention_mask)
        return sequence_logps(outputs, labels)
    scored = (batch.labels != IGNORE_INDEX) & (batch.predictor >= 0)
    rows, positions = scored.nonzero(as_tuple=True)
    scores = scores_at(model, batch.input_ids, batch.attention_mask, batch.position_ids, rows,
                       batch.predictor[rows, positions], batch.labels[rows, positions])  # one per scored token
    sequence, n = batch.sequence[rows, positions], 2 * batch.num_pairs
    logps = scores.logps.new_zeros(n).index_add(0, sequence, scores.logps)
    n_tokens = torch.bincount(sequence, minlength=n)
    mean_logits = scores.logps.new_zeros(n).index_add(0, sequence, scores.mean_logits) / n_tokens.clamp(min=1)
    return logps, n_tokens, mean_logits


def shared_reward_scores(model, batch: SharedPairBatch) -> torch.Tensor:
    """A reward model's score of each sequence (2 * pairs,) of shared-prompt rows, read at the token
    the export's own forward reads it at in the sequence's own row (the last that is not padding;
    `models.reward_scores`): the score head on the body's hidden state there."""
    hf = _hf_model(model)
    body = getattr(hf, hf.base_model_prefix)
    hidden = body(input_ids=batch.input_ids, attention_mask=model_mask(model, batch.attention_mask),
                  position_ids=batch.position_ids, use_cache=False).last_hidden_state
    return hf.score(hidden[batch.reward_row, batch.reward_position]).squeeze(-1).float()


def reply_lengths(batch: PairBatch | SharedPairBatch) -> torch.Tensor:
    """Trained tokens per sequence (2 * pairs,)."""
    if isinstance(batch, PairBatch):
        return (batch.labels != IGNORE_INDEX).sum(-1)
    return batch.reply_lengths
