"""What RL sampling needs to draw replies from the distribution the loss assumes: only the
settings the loss models, no dropout, each token's log-prob as it was sampled, and no setting
taken from the checkpoint's generation_config.json; and the sampler that draws them from the policy itself
(`Sampler`, returning a `Sample`), which the vLLM backend (llm_stages.rollout.vllm_client) replaces."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers import GenerationConfig

from llm_stages.adapters import is_adapted
from llm_stages.data.kinds.prompt import PromptBatch
from llm_stages.ranges import SAMPLING_SETTINGS, check_sampling_settings
from llm_stages.rollout.decode import Drawing, decode

log = logging.getLogger(__name__)

# The settings RL sampling models are declared with their ranges in llm_stages.ranges (checked with the
# config, before any model loads). Anything else in the checkpoint's generation_config.json
# (repetition_penalty, no_repeat_ngram_size, ...) is left out, as it must be for the ratio to compare
# like with like; the warning names what was left out. These keys do not change the distribution:
NOT_SAMPLING = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                "max_length", "use_cache", "output_attentions", "output_hidden_states", "return_dict_in_generate",
                "_from_model_config")


def log_ignored_generation_settings(model) -> None:
    settings = model.generation_config.to_diff_dict() if getattr(model, "generation_config", None) else {}
    ignored = {k: v for k, v in settings.items() if k not in (*SAMPLING_SETTINGS, *NOT_SAMPLING)}
    if ignored:
        log.warning("RL sampling ignores the checkpoint's generation_config %s: the loss models only %s "
                    "(rollout.generation)", ignored, ", ".join(SAMPLING_SETTINGS))


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and the checkpoint's own."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generation_config(generation: dict, tokenizer, eos: list[int]) -> GenerationConfig:
    """Exactly the sampling the loss models: `generation`'s settings, and nothing from the checkpoint."""
    do_sample = generation.get("do_sample", True)
    settings = {"temperature": generation.get("temperature") or 1.0, "top_p": generation.get("top_p") or 1.0,
                "top_k": generation.get("top_k") or 0} if do_sample else {}
    return GenerationConfig(max_new_tokens=generation["max_new_tokens"], do_sample=do_sample, **settings,
                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer, also in train mode (which gradient checkpointing needs): the
    ratio of a PPO/GRPO update compares log-probs of two forward passes, and dropout would make it
    differ from 1 before any update (as TRL does; HF attention applies its dropout from a float attribute)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextmanager
def generation_defaults(model: torch.nn.Module, config: GenerationConfig):
    """`config` as the model's generation config while generating: generate() fills every setting
    left unset from the model's own config (the checkpoint's generation_config.json), so passing
    `config` alone would not keep a repetition_penalty out."""
    hf_model = model.get_base_model() if is_adapted(model) else model
    saved, hf_model.generation_config = hf_model.generation_config, config
    try:
        yield
    finally:
        hf_model.generation_config = saved


# --- the sampler: replies drawn from the policy itself (rollout.backend=hf; llm_stages.rollout.vllm_client: vllm) ---

class Sample(NamedTuple):
    """Sampled replies: prompts left-padded to P, replies right-padded to R. A multi-turn episode
    (llm_stages.rollout.episodes) is one reply: the policy's turns and, between them, the tokens the
    environment added (tool results, the template's turn markers), which the policy reads but did not sample."""

    query: torch.Tensor  # (N, P) prompt ids
    query_mask: torch.Tensor  # (N, P)
    response: torch.Tensor  # (N, R) the reply's ids, padding after its end
    # (N, R) 1 on the tokens the policy sampled (through each turn's EOS): the only tokens that count in
    # the loss, the KL, advantages and values
    response_mask: torch.Tensor
    sampled_logprobs: torch.Tensor  # (N, R) each token's log-prob at sampling time (0 where not sampled)
    observation_mask: torch.Tensor  # (N, R) 1 on the tokens an environment added inside an episode (0 for one turn)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask | self.observation_mask], 1)

    def rows(self, index: torch.Tensor) -> "Sample":
        return Sample(*(field[index] for field in self))


class Sampler:
    """Replies drawn from the policy with exactly the settings the loss models (`generation`;
    `val_generation` overrides them for validation)."""

    def __init__(self, model, tokenizer, generation: dict, val_generation: dict | None = None):
        self.generation = dict(generation)
        self.val_generation = {**self.generation, **dict(val_generation or {})}
        check_sampling_settings(self.generation)
        check_sampling_settings(self.val_generation, key="rollout.val_generation")
        log_ignored_generation_settings(model)
        self.tokenizer, self.eos_ids = tokenizer, eos_ids(model, tokenizer)

    @torch.no_grad()
    def sample(self, model, prompts: PromptBatch, *, repeats: int = 1, generation: dict, seed: int) -> Sample:
        """Replies to each prompt (`repeats` per prompt, consecutive; each prompt forwarded once), with
        the sampling-time log-prob of each reply token (llm_stages.rollout.decode); the mask covers each
        reply through its first EOS. `generation.batch_size` bounds the replies decoded at once."""
        query = prompts.input_ids.repeat_interleave(repeats, 0)
        query_mask = prompts.attention_mask.repeat_interleave(repeats, 0)
        rows = generation.get("batch_size") or query.shape[0]
        # Prompts per decode call; a bound smaller than one prompt's replies splits them (each forwarded again).
        prompts_per_call, copies = (max(rows // repeats, 1), repeats) if rows >= repeats else (rows, 1)
        ids, mask = (prompts.input_ids, prompts.attention_mask) if copies > 1 else (query, query_mask)
        drawing = Drawing.of(generation)
        was_training = model.training
        model.eval()  # also turns gradient checkpointing off, so decoding uses the KV cache
        responses, logprobs = [], []
        devices = [query.device] if query.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, ids.shape[0], prompts_per_call):
                part = slice(start, start + prompts_per_call)
                response, logprob = decode(model, ids[part], mask[part], repeats=copies, drawing=drawing,
                                           max_new_tokens=generation["max_new_tokens"], eos=self.eos_ids,
                                           pad_token_id=self.tokenizer.pad_token_id)
                responses.append(response)
                logprobs.append(logprob)
        model.train(was_training)
        return finish_sample(query, query_mask, responses, logprobs, self.eos_ids, self.tokenizer.pad_token_id)

    def sync(self, model, version: int | None) -> None:
        """Nothing to do: this sampler generates with the policy itself (the vLLM one sends it its weights)."""

    def close(self) -> None:
        pass


def finish_sample(query, query_mask, responses: list[torch.Tensor], logprobs: list[torch.Tensor], eos: list[int],
                  pad_token_id: int) -> Sample:
    """A `Sample` from chunks of generated ids and their log-probs (each (n, r_i)): right-padded to the
    longest, masked through each reply's first EOS, padding after it."""
    width = max(r.shape[1] for r in responses)
    pad = lambda x, value: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)  # noqa: E731
    response = torch.cat([pad(r, pad_token_id) for r in responses])
    is_eos = torch.isin(response, torch.tensor(eos, device=response.device))
    response_mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()  # through the first EOS
    response = response.masked_fill(response_mask == 0, pad_token_id)
    sampled = torch.where(response_mask.bool(), torch.cat([pad(lp, 0.0) for lp in logprobs]), 0.0)
    return Sample(query, query_mask, response, response_mask, sampled, torch.zeros_like(response_mask))
