"""The decode loop RL sampling runs (rollout.backend=hf): the policy's own forward with a KV cache, one
token per step, drawing from exactly the distribution the loss models and recording each drawn
token's log-prob.

Why not `model.generate`: (1) a prompt answered `repeats` times is forwarded once, then its KV cache
is copied per reply (generate forwards every copy: for GRPO that is `num_generations` prefills of the
same prompt); (2) a token is drawn by inverting the CDF with one uniform number per reply, where
`torch.multinomial` draws an exponential per vocabulary entry (on CPU ~9 ms a step for 8 replies x
49k ids, a tenth of a small model's decode step); (3) the log-prob of the drawn token is read where
it is drawn. The distribution is generate's: temperature, then top-k, then top-p, with transformers'
own warpers; greedy is the argmax. Positions and padding follow generate's (positions counted over
real tokens, so left padding does not shift a prompt).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache, TopKLogitsWarper, TopPLogitsWarper


class Drawing(NamedTuple):
    """How each token is chosen: sampled at `temperature` from the top-k / top-p tokens, or greedy."""

    do_sample: bool
    temperature: float = 1.0
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1.0: every token

    @classmethod
    def of(cls, generation: dict) -> "Drawing":
        if not generation.get("do_sample", True):
            return cls(False)
        return cls(True, float(generation.get("temperature") or 1.0), int(generation.get("top_k") or 0),
                   float(generation.get("top_p") or 1.0))


def draw(logits: torch.Tensor, drawing: Drawing) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` (rows, vocab) and its log-prob under logits / temperature over the
    whole vocabulary (before top-k/top-p truncation, which the loss does not model; greedy: at
    temperature 1), each (rows,)."""
    scores = logits.float()
    if not drawing.do_sample:
        token = scores.argmax(-1)
    else:
        scores = scores / drawing.temperature
        kept = scores
        if drawing.top_k:
            kept = TopKLogitsWarper(drawing.top_k)(None, kept)
        if drawing.top_p < 1.0:
            kept = TopPLogitsWarper(drawing.top_p)(None, kept)
        # Inverse CDF in float64: a token of probability 0 spans an empty interval, so it is never drawn.
        cdf = torch.softmax(kept, -1, dtype=torch.float64).cumsum(-1)
        uniform = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    logprob = scores.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(scores, -1)
    return token, logprob


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, repeats: int, max_new_tokens: int,
           drawing: Drawing, eos: list[int], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replies to left-padded prompts (B, P), `repeats` per prompt (consecutive rows), drawn with the
    global RNG: (B * repeats, R) token ids (`pad_token_id` after a reply's EOS) and (B * repeats, R)
    their log-probs (see `draw`; 0 after EOS), R <= max_new_tokens. A reply that has ended leaves the
    batch (its rows of the KV cache are dropped), so the last steps run only the replies still going."""
    positions = position_ids(attention_mask)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    if repeats > 1:  # the prompt's KV cache, copied for each of its replies
        cache.batch_repeat_interleave(repeats)
        logits, attention_mask = logits.repeat_interleave(repeats, 0), attention_mask.repeat_interleave(repeats, 0)
        positions = positions.repeat_interleave(repeats, 0)
    position, device = positions[:, -1:], input_ids.device
    rows = logits.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)  # also under bf16-true
    going = torch.arange(rows, device=device)  # the replies in the batch, by row
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token, logprob = draw(logits, drawing)
        tokens[going, step], logprobs[going, step] = token, logprob
        ended = torch.isin(token, eos_ids)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            going, token, attention_mask, position = going[keep], token[keep], attention_mask[keep], position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return tokens[:, :step + 1], logprobs[:, :step + 1]
