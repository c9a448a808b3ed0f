"""The chunked LM head (llm_stages.losses.chunked) against the full logits: values and gradients."""

from __future__ import annotations

import pytest
import torch

from llm_stages.losses.chunked import LastPositions, logits_scores, token_logprobs


def _case(n=7, hidden=5, vocab=11, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.double))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g, dtype=torch.double))
    h = torch.randn(n, hidden, generator=g, dtype=torch.double, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.randn(n, generator=g, dtype=torch.double)  # a loss that weighs every token differently
    return head, h, labels, weights


def _grads(head, h, *scalars):
    sum(scalars).backward()
    grads = [h.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if head.bias is not None else [])
    h.grad = None
    head.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature,softcap,bias", [(1.0, None, False), (0.7, None, True), (1.3, 2.5, False)])
def test_chunked_scores_and_gradients_equal_the_full_logits(chunk_size, temperature, softcap, bias):
    head, h, labels, weights = _case(bias=bias)
    logits = head(h)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = logits_scores(logits, labels, temperature=temperature, with_entropy=True)
    want_grads = _grads(head, h, (want.logps * weights).sum(), (want.entropy * weights.flip(0)).sum())

    got = token_logprobs(h, head, labels, chunk_size=chunk_size, temperature=temperature, softcap=softcap,
                         with_entropy=True)
    for name in ("logps", "mean_logits", "entropy"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name).double(), atol=1e-5, rtol=1e-5)
    got_grads = _grads(head, h, (got.logps * weights).sum(), (got.entropy * weights.flip(0)).sum())
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_uniform_logits_give_log_vocab_entropy_and_ignored_labels_score_zero():
    head = torch.nn.Linear(4, 8, bias=False)
    torch.nn.init.zeros_(head.weight)
    hidden = torch.randn(2, 3, 4)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 7]])
    scores = LastPositions(hidden, head, chunk_size=2).scores(labels, with_entropy=True)
    log8 = torch.log(torch.tensor(8.0))
    torch.testing.assert_close(scores.logps, torch.tensor([[-1.0, 0, -1], [0, 0, -1]]) * log8)
    torch.testing.assert_close(scores.entropy, torch.tensor([[1.0, 0, 1], [0, 0, 1]]) * log8)


def test_no_gradient_needed_runs_under_no_grad():
    head, h, labels, _ = _case()
    with torch.no_grad():
        got = token_logprobs(h, head, labels, chunk_size=2)
    assert not got.logps.requires_grad and got.entropy is None
    torch.testing.assert_close(got.logps, logits_scores(head(h), labels).logps.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, "autocast"])
def test_low_precision_scores_equal_the_full_logits_at_bf16_accuracy(dtype):
    """A bf16 head (or bf16 autocast over a float32 one, whose backward recomputes under the same autocast)."""
    head, h, labels, _ = _case(n=9, hidden=16, vocab=50)
    head, h = head.float(), h.detach().float()
    if dtype is torch.bfloat16:
        head, h = head.to(dtype), h.to(dtype)
    h.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
        want = logits_scores(head(h), labels)
        want_grads = _grads(head, h, want.logps.sum())
        got = token_logprobs(h, head, labels, chunk_size=4)
        got_grads = _grads(head, h, got.logps.sum())
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=1e-5)  # the same bf16 logits, in float
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=2e-2, rtol=2e-2)


def test_no_scored_position_scores_zero_and_backpropagates_zero():
    head = torch.nn.Linear(4, 8, bias=False)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    scores = LastPositions(hidden, head, chunk_size=2).scores(torch.full((2, 3), -100))
    assert torch.equal(scores.logps, torch.zeros(2, 3))
    scores.logps.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(head.weight.grad, torch.zeros(8, 4))
