"""LoRA and QLoRA (peft + bitsandbytes) for every stage, chosen by the `peft` config group.

- `peft=lora`: low-rank adapters on the configured modules; only they (and a reward model's
  score head) train.
- `peft=qlora`: the same on a base model loaded in 4-bit nf4 by bitsandbytes (CPU or GPU).

Under an adapter the frozen reference of DPO/PPO/GRPO is the base model with the adapter
switched off (`reference_of`), so no second copy of the weights is held. Exports are either the
adapter alone (peft's `save_pretrained`) or, with `export.merge_lora=true`, a plain model with
the adapter merged in (`merged_model`), which any later stage loads with `model.path=`.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import torch

from llm_stages.errors import ConfigError

log = logging.getLogger(__name__)


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def quantization_config(peft_cfg, dtype: torch.dtype):
    """bitsandbytes 4-bit settings for from_pretrained, or None without `peft.quantization`."""
    quant = (peft_cfg or {}).get("quantization")
    if not quant:
        return None
    from transformers import BitsAndBytesConfig

    compute_dtype = getattr(torch, str(quant.get("compute_dtype") or str(dtype).removeprefix("torch.")))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
                              bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
                              bnb_4bit_compute_dtype=compute_dtype)


def load_trainable_model(model_cfg, tokenizer, *, head: str = "causal_lm", peft_cfg=None):
    """The model a stage trains: `model_cfg`'s model, in 4 bit and/or with LoRA adapters when
    `peft_cfg` (the `peft` group) says so."""
    from llm_stages.models import load_model

    dtype = getattr(torch, str(model_cfg.get("dtype", "float32")))
    # A scalar head is trained from scratch: on a causal LM export (stage=rm, the PPO critic) it starts fresh.
    model = load_model(model_cfg, tokenizer, head=head, quantization=quantization_config(peft_cfg, dtype),
                       new_head=head == "reward")
    if peft_cfg:
        model = apply_lora(model, peft_cfg, head=head, gradient_checkpointing=bool(model_cfg.get("gradient_checkpointing")))
    return model


def apply_lora(model, peft_cfg, *, head: str = "causal_lm", gradient_checkpointing: bool = False):
    """`model` wrapped with fresh LoRA adapters as `peft_cfg` says (r, alpha, dropout, target_modules)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if peft_cfg.get("method", "lora") != "lora":
        raise ConfigError(f"peft.method must be 'lora', got {peft_cfg.get('method')!r}")
    if getattr(model, "is_loaded_in_4bit", False):
        # Norms and embeddings to float32 and input grads on, as QLoRA training needs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_cpu_4bit_weights_intact(model)
    targets = peft_cfg.get("target_modules") or "all-linear"
    config = LoraConfig(r=int(peft_cfg.r), lora_alpha=float(peft_cfg.alpha), lora_dropout=float(peft_cfg.dropout),
                        target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                        modules_to_save=list(peft_cfg.get("modules_to_save") or []) or None,
                        # SEQ_CLS also trains the reward model's fresh `score` head in full.
                        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%g on %s%s: %.2fM of %.2fM parameters train (%.2f%%)", config.r, config.lora_alpha,
             targets, " over a 4-bit base" if getattr(model, "is_loaded_in_4bit", False) else "",
             trainable / 1e6, total / 1e6, 100 * trainable / max(total, 1))
    return model


def keep_cpu_4bit_weights_intact(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a Linear4bit's weight in place for its AVX512-BF16 CPU kernel on the
    first no-grad eval forward, and training forwards then read the repacked data as if it were the
    original layout (garbage outputs). Turning the fast path off on every layer keeps one layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the initial policy, or None under an adapter (the base serves, see `reference_of`)."""
    if is_adapted(model):
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


@contextmanager
def reference_of(policy: torch.nn.Module, frozen_copy: torch.nn.Module | None):
    """The reference model to run under no_grad: the frozen copy, or the policy with its adapter
    disabled (in eval mode, as the copy would be)."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    was_training = policy.training
    policy.eval()
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(was_training)


def _dequantized(param: torch.Tensor) -> torch.Tensor:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return param.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(param.data, quant_state)


def merged_model(model, dtype: torch.dtype | None = None):
    """A plain (unquantised, adapter-free) copy of an adapted model: every LoRA layer's weight is
    its base weight — dequantised first under QLoRA — plus the adapter's delta (alpha/r)·B·A.
    That is exactly the function the adapted model computes, unlike merging into re-quantised
    weights. The training model is left untouched, so this also serves periodic exports."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = dtype or next(p for p in base.parameters() if p.is_floating_point()).dtype
    merged = type(base)(config).to(dtype)

    state: dict[str, torch.Tensor] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name or ".original_module." in name:
            continue
        clean = name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        state[clean] = _dequantized(param)
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                state[f"{name}.weight"] = state[f"{name}.weight"] + module.get_delta_weight(adapter).to(state[f"{name}.weight"])
    missing, unexpected = merged.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"merging the adapter: weights missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    merged.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        merged.generation_config = copy.deepcopy(base.generation_config)
    return merged.eval()


def exportable(model: torch.nn.Module, merge_lora: bool) -> torch.nn.Module:
    """What an export saves: the model itself, an adapter alone, or the merged model."""
    return merged_model(model) if merge_lora and is_adapted(model) else model
