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


def test_labelled_logits_skip_the_shared_prompt_and_change_no_number():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llm_stages.losses.causal import labelled_logits, sequence_logps

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    input_ids = torch.randint(0, 64, (2, 10))
    labels = input_ids.clone()
    labels[0, :6] = -100  # row 0: prompt of 6 tokens
    labels[1, :4] = -100  # row 1: prompt of 4 tokens, so position 3 is the first to predict a label
    labels[1, 8:] = -100  # and right padding
    full = model(input_ids=input_ids, use_cache=False).logits
    kept, kept_labels = labelled_logits(model, labels, input_ids=input_ids)
    assert kept.shape == (2, 7, 64) and kept_labels.shape == (2, 7)
    torch.testing.assert_close(kept, full[:, 3:])
    for got, want in zip(sequence_logps(kept, kept_labels), sequence_logps(full, labels)):
        torch.testing.assert_close(got, want)
    got_ce, got_n = token_cross_entropy(kept, kept_labels)
    want_ce, want_n = token_cross_entropy(full, labels)
    torch.testing.assert_close(got_ce, want_ce)
    assert got_n == want_n == 4 + 4
    # Nothing labelled (all -100): every position is kept.
    assert labelled_logits(model, torch.full_like(labels, -100), input_ids=input_ids)[0].shape == (2, 10, 64)
