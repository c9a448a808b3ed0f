"""model.lean_activations (llm_stages.lean_layers): a model's RMSNorms and gated MLPs computed keeping fewer
activations for the backward pass — the same loss and gradients as the model's own forward, and exactly
the activations it is meant to drop."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from llm_stages.lean_layers import LEAN_ATTRIBUTE, make_lean

SHAPES = dict(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _model(cls, config_cls, **extra):
    torch.manual_seed(0)
    model = cls(config_cls(**SHAPES, **extra)).train()
    with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma's 1 + w): make their weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPES["vocab_size"], (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the 4-D mask path
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_loss_and_gradients(want_model, got_model):
    ids, mask = _batch()
    want_loss, want = _loss_and_grads(want_model, ids, mask)
    got_loss, got = _loss_and_grads(got_model, ids, mask)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cls,config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_lean_layers_give_the_models_own_loss_and_every_gradient(cls, config_cls):
    model = _model(cls, config_cls)
    lean = copy.deepcopy(model)
    switched = make_lean(lean)
    # 2 norms per layer and the final one; one MLP per layer; each decoder layer recomputes its norm outputs.
    arch = config_cls.__name__[:-len("Config")]
    assert switched == {f"{arch}RMSNorm": 5, f"{arch}MLP": 2, f"{arch}Attention": 2, f"{arch}DecoderLayer": 2}
    _assert_same_loss_and_gradients(model, lean)


def test_lean_layers_under_bf16_autocast_match_the_models_own():
    model = _model(Qwen2ForCausalLM, Qwen2Config)
    lean = copy.deepcopy(model)
    make_lean(lean)
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = _loss_and_grads(model, ids, mask)
        got_loss, got = _loss_and_grads(lean, ids, mask)
    assert all(g.dtype == torch.float32 for g in got.values())
    torch.testing.assert_close(got_loss, want_loss, atol=2e-3, rtol=2e-3)
    for name in want:  # bf16 products: compare at bf16's precision, relative to each gradient's size
        scale = want[name].abs().max()
        torch.testing.assert_close(got[name] / scale, want[name] / scale, atol=2e-2, rtol=0, msg=name)


def test_a_norm_that_computes_something_else_keeps_its_own_forward():
    # Gemma's RMSNorm scales by (1 + weight); its gated MLP (GELU-tanh) has the lean structure.
    model = _model(GemmaForCausalLM, GemmaConfig, head_dim=8)
    lean = copy.deepcopy(model)
    assert make_lean(lean) == {"GemmaMLP": 2, "GemmaAttention": 2}
    assert not any(getattr(m, LEAN_ATTRIBUTE, False) for m in lean.modules() if type(m).__name__ == "GemmaRMSNorm")
    _assert_same_loss_and_gradients(model, lean)


def test_an_mlp_whose_projections_are_wrapped_later_falls_back_to_its_own_forward():
    from peft import LoraConfig, get_peft_model

    model = _model(Qwen2ForCausalLM, Qwen2Config)
    make_lean(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
    reference = _model(Qwen2ForCausalLM, Qwen2Config)
    reference = get_peft_model(reference, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj",
                                                                           "q_proj"]))
    reference.load_state_dict(lora.state_dict())
    _assert_same_loss_and_gradients(reference, lora)  # the LoRA weights' gradients


def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct activations autograd keeps for the backward pass (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask).logits.sum()
    return sum(seen.values())


def test_lean_layers_keep_exactly_the_activations_they_mean_to_drop_fewer():
    model = _model(Qwen2ForCausalLM, Qwen2Config)
    lean = copy.deepcopy(model)
    make_lean(lean)
    ids, mask = _batch()
    tokens, layers = ids.numel(), SHAPES["num_hidden_layers"]
    # Per token: each MLP drops act(gate) and the product (2 × intermediate), each norm its normalised input,
    # and each norm inside a decoder layer its output too (the final norm's output is the model's own);
    # and the layers share one float attention mask (rows, 1, T, T) instead of one each.
    batch, length = ids.shape
    norms = 2 * layers + 1 + 2 * layers
    dropped = (tokens * (layers * 2 * SHAPES["intermediate_size"] + norms * SHAPES["hidden_size"])
               + (layers - 1) * batch * length * length) * 4
    assert _saved_bytes(model, ids, mask) - _saved_bytes(lean, ids, mask) == dropped


def test_the_norm_outputs_inside_decoder_layers_are_freed_after_the_forward_pass():
    # Counting saved tensors is not enough: the outputs must not be kept alive by anything else either.
    import weakref

    model = _model(Qwen2ForCausalLM, Qwen2Config)
    make_lean(model)
    outputs = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    ids, mask = _batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert len(outputs) == 4 and all(ref() is None for ref in outputs)
    loss.backward()  # recomputed where the backward pass reads them
    assert all(p.grad is not None for p in model.parameters())


def test_norm_outputs_are_recomputed_under_hooks_already_in_place_which_get_every_other_tensor():
    # Hooks the user put around the forward (CPU offloading, say) still receive every tensor the layers
    # keep, the norms' inputs included; only the norm outputs are recomputed instead of kept.
    model = _model(Qwen2ForCausalLM, Qwen2Config)
    lean = copy.deepcopy(model)
    make_lean(lean)
    ids, mask = _batch()
    packed = []

    def pack(t):
        packed.append(t.shape)
        return ("outer", t)

    def unpack(box):
        assert box[0] == "outer"
        return box[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        _assert_same_loss_and_gradients(model, lean)
    assert packed  # the outer hooks were used by both models


def test_under_gradient_checkpointing_the_layers_keep_their_own_forward_and_the_same_gradients():
    model = _model(Qwen2ForCausalLM, Qwen2Config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lean = copy.deepcopy(model)
    make_lean(lean)
    _assert_same_loss_and_gradients(model, lean)
    ids, mask = _batch()
    # Checkpointing keeps only each layer's inputs; recording norm outputs must not keep more.
    assert _saved_bytes(lean, ids, mask) <= _saved_bytes(model, ids, mask)


def test_layers_wrapped_for_checkpointing_from_outside_give_the_same_gradients():
    # FSDP's activation checkpointing wraps each layer module: the layer's forward runs inside the
    # checkpoint's hooks, which unpack each saved tensor only once, while q, k and v each read the norm output.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    model = _model(Qwen2ForCausalLM, Qwen2Config)
    lean = copy.deepcopy(model)
    make_lean(lean)
    for m in (model, lean):
        apply_activation_checkpointing(m, check_fn=lambda module: isinstance(module, Qwen2DecoderLayer))
    _assert_same_loss_and_gradients(model, lean)


def test_a_norm_output_changed_in_place_after_its_forward_is_kept_as_it_is():
    from llm_stages.lean_layers import NormOutputs, _NormView

    x, weight, rstd = torch.randn(2, 4), torch.randn(4), torch.rand(2, 1)
    output = weight * (x * rstd)
    outputs = NormOutputs(None)
    outputs.add(output, x, weight, rstd)
    view = outputs.pack(output.view(8))
    assert isinstance(view, _NormView) and torch.equal(outputs.unpack(view), output.view(8))
    output.mul_(2)  # what autograd would refuse at backward: the value is no longer what the norm made
    assert outputs.pack(output) is output


def test_grouped_query_attention_without_copies_keeps_fewer_activations_with_the_same_gradients(monkeypatch):
    from llm_stages.lean_layers import GQA_WITHOUT_COPIES

    model = _model(Qwen2ForCausalLM, Qwen2Config)
    ids, mask = _batch()  # padded: transformers copies the key/value heads whenever there is a mask
    monkeypatch.setenv(GQA_WITHOUT_COPIES, "0")
    copied = _saved_bytes(model, ids, mask)
    want_loss, want = _loss_and_grads(model, ids, mask)
    monkeypatch.setenv(GQA_WITHOUT_COPIES, "1")
    grouped = _saved_bytes(model, ids, mask)
    got_loss, got = _loss_and_grads(model, ids, mask)
    # Per token and layer: keys and values for 4 query heads became 2 key/value heads' own (head_dim 8).
    head_dim = SHAPES["hidden_size"] // SHAPES["num_attention_heads"]
    heads_saved = SHAPES["num_attention_heads"] - SHAPES["num_key_value_heads"]
    assert copied - grouped == ids.numel() * SHAPES["num_hidden_layers"] * 2 * heads_saved * head_dim * 4
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_grouped_query_attention_is_left_to_transformers_where_cuda_is_or_the_user_chose(monkeypatch):
    from llm_stages import lean_layers

    monkeypatch.delenv(lean_layers.GQA_WITHOUT_COPIES, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not lean_layers.grouped_query_attention_without_copies()
    assert lean_layers.GQA_WITHOUT_COPIES not in __import__("os").environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(lean_layers.GQA_WITHOUT_COPIES, "0")
    assert not lean_layers.grouped_query_attention_without_copies()
    monkeypatch.delenv(lean_layers.GQA_WITHOUT_COPIES)
    assert lean_layers.grouped_query_attention_without_copies()


def test_model_lean_activations_is_on_by_default_and_false_leaves_the_model_as_it_is(make_cfg, tokenizer):
    from llm_stages.models import load_model

    def lean_classes(model):
        return sorted({type(m).__name__ for m in model.modules() if getattr(m, LEAN_ATTRIBUTE, False)})

    assert lean_classes(load_model(make_cfg().model, tokenizer)) == ["Qwen2Attention", "Qwen2DecoderLayer", "Qwen2MLP",
                                                                   "Qwen2RMSNorm"]
    assert lean_classes(load_model(make_cfg("model.lean_activations=false").model, tokenizer)) == []
