"""Per-token log-probs of labels without the full `[tokens, vocab]` logits.

Every stage scores tokens the same way: the log-probability of each trained token, sometimes the
entropy of the distribution it was drawn from, and the mean logit (a logged statistic). With a large
vocabulary and long sequences, the LM head's float logits (and their gradient, and softmax copies) are
the largest tensors of a step: 8 rows x 2048 tokens x 150k vocab x 4 bytes = 10 GB each.

`token_logprobs` computes all three from the model's last hidden state and the LM head's weight,
`chunk_size` tokens at a time, forward and backward (a custom autograd function that recomputes each
chunk's logits in the backward and accumulates the gradients of the hidden states and the head's
weight chunk by chunk). Peak memory for the head is a few `chunk_size x vocab` float tensors; a
model's final-logit soft-capping (Gemma-2) and the sampling temperature (RL) are applied per chunk.
`python -m bench.lm_head_memory` measures it against the full logits.

`head_outputs(model, keep, ...)` is what the stages call: the model's outputs at its last `keep`
positions, as hidden states when the chunked head applies to the model (`model.chunked_lm_head`,
set on the model by llm_stages.models.load_model) or as logits otherwise; `LastPositions.scores`
then gives the same numbers either way. Where the chunked head cannot run, the logits path runs and
the log says why, once: a sharded model (its head's weights are only gathered inside its own forward),
an LM head that is not a plain linear layer (a LoRA- or modules_to_save-wrapped head, 4-bit), or a
model whose own logits are not the head on its last hidden state (checked at its first forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Where load_model records the chunk size on the model it loads (None or absent: the logits path).
CHUNK_ATTRIBUTE = "lm_head_chunk_size"
# Set on a model once its head has been checked against its own logits (or found to differ: why).
VERIFIED_ATTRIBUTE, MISMATCH_ATTRIBUTE = "_chunked_head_verified", "_chunked_head_mismatch"
_explained: set[str] = set()


class TokenScores(NamedTuple):
    logps: torch.Tensor          # log p(label) at each scored position (0 where not scored)
    mean_logits: torch.Tensor    # the mean over the vocabulary of the (unscaled) logits; no gradient
    entropy: torch.Tensor | None  # entropy of the distribution at `temperature`, when asked for


# -- the chunked computation -------------------------------------------------------------------
def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> torch.Tensor:
    """The head's logits of one chunk, in float32, rounded as the model's own forward rounds them."""
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


class _ChunkedHead(torch.autograd.Function):
    """Forward and backward one chunk of rows at a time, in place where it can: at most two or three
    `chunk x vocab` float tensors live at once (the backward recomputes the chunk's logits)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, temperature, softcap, with_entropy):
        n = hidden.shape[0]
        # The backward recomputes the logits as the forward computed them: under the same autocast.
        device = hidden.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        logps = hidden.new_empty(n, dtype=torch.float32)
        means, entropy = torch.empty_like(logps), torch.empty_like(logps)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, bias, softcap)
            means[rows] = logits.mean(-1)
            if temperature != 1.0:
                logits.div_(temperature)
            lse = logits.logsumexp(-1)
            logps[rows] = logits.gather(-1, labels[rows, None]).squeeze(-1) - lse
            if with_entropy:  # H = lse - sum(p * scaled logits)
                entropy[rows] = lse - (logits - lse[:, None]).exp_().mul_(logits).sum(-1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, entropy)
        ctx.settings = (chunk_size, temperature, softcap, with_entropy)
        ctx.mark_non_differentiable(means)
        return logps, means, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_means, grad_entropy):
        hidden, weight, bias, labels, entropy = ctx.saved_tensors
        chunk_size, temperature, softcap, with_entropy = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = None  # the first chunk's product, then accumulated: no (vocab x hidden) zero fill
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.autocast(**ctx.autocast):
                logits = _chunk_logits(hidden[rows], weight, bias, softcap)
            # d (c tanh(x / c)) / dx = 1 - (logit / c)^2
            capped = 1 - (logits / softcap) ** 2 if softcap else None
            if temperature != 1.0:
                logits.div_(temperature)
            # d logp(y) / d scaled = onehot(y) - p;  d H / d scaled = -p * (log p + H)
            log_probs = logits.log_softmax(-1)
            del logits
            grad = log_probs.exp()  # p
            if with_entropy:
                log_probs.add_(entropy[rows, None]).mul_(grad).mul_(grad_entropy[rows, None])
            grad.mul_(-grad_logps[rows, None])
            if with_entropy:
                grad.sub_(log_probs)
            del log_probs
            grad.scatter_add_(-1, labels[rows, None], grad_logps[rows, None])
            if temperature != 1.0:
                grad.div_(temperature)
            if capped is not None:
                grad.mul_(capped)
                del capped
            if grad_hidden is not None:
                # In the weight's dtype, as the model's own backward multiplies: no float copy of a bf16 head.
                grad_hidden[rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                with torch.autocast(hidden.device.type, enabled=False):  # accumulated in float32
                    grad_weight = torch.mm(grad.T, hidden[rows].float()) if grad_weight is None else \
                        grad_weight.addmm_(grad.T, hidden[rows].float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad
        if need_weight and grad_weight is None:  # no rows
            grad_weight = torch.zeros_like(weight)
        return (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None, None, None, None, None, None)


def token_logprobs(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, *, chunk_size: int = 1024,
                   temperature: float = 1.0, softcap: float | None = None, with_entropy: bool = False) -> TokenScores:
    """Scores of `labels` (n,) from the last hidden states (n, hidden) that predict them, through the
    linear `head` (then `softcap`, as Gemma-2 caps its logits, then `temperature`), never holding
    more than `chunk_size` rows of logits. Gradients reach `hidden` and the head's weight and bias."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logps, means, entropy = _ChunkedHead.apply(hidden, head.weight, head.bias, labels, int(chunk_size),
                                               float(temperature), softcap, with_entropy)
    return TokenScores(logps, means, entropy if with_entropy else None)


def logits_scores(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                  with_entropy: bool = False) -> TokenScores:
    """The same scores from logits (..., vocab) the model already produced; `labels` (...)."""
    logits = logits.float()
    scaled = logits / temperature
    # log p(label) = logit[label] - logsumexp(logits): no full log_softmax copy of the logits.
    logps = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
    entropy = None
    if with_entropy:
        log_probs = F.log_softmax(scaled, -1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return TokenScores(logps, logits.detach().mean(-1), entropy)


# -- where the stages call it ------------------------------------------------------------------
@dataclass
class LastPositions:
    """The model's outputs at its last positions: its final hidden states when `head` is set (the
    LM head runs here, in chunks), else its logits."""
    values: torch.Tensor
    head: nn.Linear | None = None
    softcap: float | None = None
    chunk_size: int = 1024

    def __getitem__(self, index) -> "LastPositions":
        return LastPositions(self.values[index], self.head, self.softcap, self.chunk_size)

    def scores(self, labels: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False) -> TokenScores:
        """Scores of `labels` (the positions' leading shape) at each position; positions labelled
        IGNORE_INDEX score 0."""
        scored = labels != IGNORE_INDEX
        if self.head is None:
            out = logits_scores(self.values, labels.clamp(min=0), temperature=temperature, with_entropy=with_entropy)
            return TokenScores(*(None if t is None else t * scored for t in out))
        every = bool(scored.all())
        hidden = self.values if every else self.values[scored]
        out = token_logprobs(hidden.flatten(0, -2), self.head, (labels if every else labels[scored]).flatten(),
                             chunk_size=self.chunk_size, temperature=temperature, softcap=self.softcap,
                             with_entropy=with_entropy)
        if every:
            return TokenScores(*(None if t is None else t.view(labels.shape) for t in out))
        return TokenScores(*(None if t is None else t.new_zeros(labels.shape).masked_scatter(scored, t) for t in out))


def chunked_head_unsupported(model: nn.Module) -> str | None:
    """Why the LM head of `model` cannot run on chunks outside its forward, or None when it can."""
    from torch.distributed.tensor import DTensor

    if getattr(model, "_is_fsdp_managed_module", False) or any(
            isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()):
        return "the model is sharded (FSDP / DeepSpeed ZeRO-3): its LM head's weights exist only inside its forward"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain linear layer (LoRA/modules_to_save on lm_head, 4-bit)"
    if head.weight.shape != (head.out_features, head.in_features):  # a flattened shard's empty view outside forward
        return "its LM head's weight is not whole outside the model's forward (sharded)"
    return None


def chunked_head(model: nn.Module) -> tuple[nn.Linear, float | None, int] | None:
    """(head, softcap, chunk size) when `model` asks for the chunked head and can run it, else None."""
    chunk_size = getattr(model, CHUNK_ATTRIBUTE, None)
    if not chunk_size:
        return None
    why = chunked_head_unsupported(model) or getattr(model, MISMATCH_ATTRIBUTE, None)
    if why:
        _explain(why)
        return None
    return model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None), int(chunk_size)


def _explain(why: str) -> None:
    """Logs once per process, on one rank, why the full logits run instead."""
    if why in _explained:
        return
    _explained.add(why)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (distributed and torch.distributed.get_rank() > 0):
        log.info("model.chunked_lm_head: full logits instead, because %s", why)


def head_outputs(model: nn.Module, keep: int, **inputs) -> LastPositions:
    """`model`'s outputs at its last `keep` positions (hidden states or logits, see LastPositions).
    Positions before them never reach the LM head (HF's `logits_to_keep`)."""
    chunked = chunked_head(model)
    if chunked is not None:
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        if _same_as_own_logits(model, hidden[:, -1], out.logits[:, -1], *chunked[:2]):
            return LastPositions(hidden[:, hidden.shape[1] - keep:], *chunked)
    return LastPositions(model(**inputs, use_cache=False, logits_to_keep=keep).logits)


@torch.no_grad()
def _same_as_own_logits(model, hidden: torch.Tensor, logits: torch.Tensor, head: nn.Linear,
                        softcap: float | None) -> bool:
    """Whether the head on the last hidden state gives the model's own logits, checked once per
    model: an architecture that scales its logits some other way (Cohere's logit_scale, Granite's
    logits_scaling, ...) or whose last hidden state is not the head's input would otherwise give
    wrong numbers; it gets the full logits from then on."""
    if getattr(model, VERIFIED_ATTRIBUTE, False):
        return True
    ours = _chunk_logits(hidden, head.weight, head.bias, softcap)
    if torch.allclose(ours, logits.float(), rtol=1e-3, atol=1e-3):
        setattr(model, VERIFIED_ATTRIBUTE, True)
        return True
    setattr(model, MISMATCH_ATTRIBUTE, f"its LM head on its last hidden state does not give its own logits "
                                       f"({type(model).__name__} transforms them further)")
    _explain(getattr(model, MISMATCH_ATTRIBUTE))
    return False
