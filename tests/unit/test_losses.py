import math

import torch

from llm_stages.losses import token_cross_entropy


def test_token_cross_entropy_matches_hand_computed_values():
    # vocab of 3, one sequence of 3 tokens: positions 0 and 1 predict labels[1] and labels[2].
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    loss_sum, n = token_cross_entropy(logits, labels)
    lse0 = math.log(math.exp(2) + 2)  # position 0 predicts token 0 (logit 2)
    lse1 = math.log(math.e + 2)  # position 1 predicts token 1 (logit 1)
    expected = (lse0 - 2.0) + (lse1 - 1.0)
    assert n.item() == 2
    assert abs(loss_sum.item() - expected) < 1e-6
    assert abs(loss_sum.item() - (0.2395447 + 0.5514447)) < 1e-6  # the same numbers, written out


def test_masked_positions_contribute_nothing():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, -100, 3], [-100, -100, -100, -100, -100]])
    loss_sum, n = token_cross_entropy(logits, labels)
    # only row 0, positions 0 (-> 2) and 3 (-> 3) are trained
    lp = torch.log_softmax(logits, -1)
    expected = -(lp[0, 0, 2] + lp[0, 3, 3])
    assert n.item() == 2
    assert torch.allclose(loss_sum, expected, atol=1e-6)
