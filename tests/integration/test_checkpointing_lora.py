"""Activation checkpointing under LoRA: the same loss and adapter gradients as without, with the
decoder layers really recomputed in the backward pass (frozen embeddings need no input grads under
non-reentrant checkpointing), and the chunked LM head on top changes nothing either."""

from __future__ import annotations

import pytest
import torch

from llm_stages.train import build


def _step(make_cfg, *overrides):
    module, datamodule = build(make_cfg("stage=sft", "peft=lora", "datamodule.length_groups=1", *overrides))
    datamodule.setup("fit")
    [batch] = next(iter(datamodule.train_dataloader()))
    module.model.train()
    attention = module.model.get_base_model().model.layers[0].self_attn
    calls = [0]
    attention.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    loss = module.loss_sum(batch)[0] / module.loss_weight(batch)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls[0], module


@pytest.mark.parametrize("chunked", [True, False])
def test_gradient_checkpointing_gives_the_same_lora_loss_and_gradients(make_cfg, chunked):
    head = f"model.chunked_lm_head={str(chunked).lower()}"
    loss_off, grads_off, calls_off, _ = _step(make_cfg, head, "model.gradient_checkpointing=false")
    loss_on, grads_on, calls_on, module = _step(make_cfg, head, "model.gradient_checkpointing=true")
    assert module.model.get_base_model().is_activation_checkpointing
    assert (calls_off, calls_on) == (1, 2)  # the layer ran again in the backward pass
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=0)
    assert grads_off.keys() == grads_on.keys() and all("lora_" in n for n in grads_off)
    assert all(g is not None for g in grads_on.values()) and any(g.abs().max() > 0 for g in grads_on.values())
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-5, msg=name)
