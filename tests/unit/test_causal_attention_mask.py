"""CausalLM passes no attention mask for right-padded rows (llm_stages.stages.causal_lm.causal_attention_mask):
causal attention alone hides the padding from every real token, so the loss and every gradient are those
of the masked forward, and the attention kernels skip the masked-out half of the scores."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from llm_stages.losses import token_cross_entropy
from llm_stages.losses.causal import labelled_outputs
from llm_stages.stages.causal_lm import causal_attention_mask


def test_right_padding_needs_no_mask_and_anything_else_keeps_it():
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert causal_attention_mask(right, None) is None
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert causal_attention_mask(left, None) is left
    holes = torch.tensor([[1, 0, 1, 0]])  # padding inside a row
    assert causal_attention_mask(holes, None) is holes
    packed_positions = torch.tensor([[0, 1, 0, 1]])  # packing: the rows' own positions go with their mask
    assert causal_attention_mask(right, packed_positions) is right
    four_d = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert causal_attention_mask(four_d, None) is four_d
    assert causal_attention_mask(None, None) is None


def test_a_right_padded_batch_without_its_mask_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).train()
    ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt part that is not trained

    def loss_and_grads(attention_mask):
        model.zero_grad(set_to_none=True)
        loss, n = token_cross_entropy(*labelled_outputs(model, labels, input_ids=ids, attention_mask=attention_mask))
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    want_loss, want = loss_and_grads(mask)
    got_loss, got = loss_and_grads(causal_attention_mask(mask, None))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
