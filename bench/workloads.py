"""The workloads of `python -m bench`: the settings both sides share, and our side's config overrides.

One table, so the settings are in one place and both sides read them from the same dict: batch
size, sequence length, learning rate and (RL) rollout shape are never restated per side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Workload:
    name: str
    stage: str  # our stage
    # which demo file: sft_train | pref_train | rl_train, or made from them (bench/prepare.py): pref_long (long
    # multi-turn prompts), sft_filled / pref_filled (multi-turn conversations / prompts filled to max_length)
    data: str
    baseline: str  # "trl" (TRL 1.16 on the same settings) or "naive" (bench/naive_ppo.py)
    batch_size: int  # per device: sequences (SFT), packed rows (SFT packed), pairs (RM, DPO), prompts (RL)
    lr: float
    steps: int  # default timed steps; --steps overrides
    max_length: int = 256  # tokens per sequence (per packed row)
    options: dict = field(default_factory=dict)  # workload-specific settings, also handed to the baseline
    caveat: str = ""  # what still differs between the sides; printed under the results table
    # Model FLOPs per parameter and real token of a step, for MFU: 6 for a trained forward + backward,
    # +2 for a reference forward in the step (DPO ref=copy); None: not reported (RL steps mostly decode).
    flops_per_param_token: int | None = 6
    in_default_run: bool = True  # False: run only when named in --workloads (a variant that doubles a long row)

    def settings(self) -> dict:
        return asdict(self)


_REFERENCE_PASS = ("the reference pass is outside the timed steps on both sides: TRL's runs in its constructor, "
                   "ours in the first training step (a warm-up step; with --warmup 0 it would be timed)")
_SHARED = ("ours forwards each prompt once ([prompt, chosen, rejected] in one row, 4-D mask), TRL twice; tokens/s "
           "counts the pairs' tokens as two rows each on both sides (the same tokens/step)")
# Both sides' LM heads are chunked (neither holds [batch, seq, vocab] logits): TRL's in tiles of 4,096 positions x
# 32,768 vocabulary columns, scoring every position off CUDA (only labelled ones needs its Triton kernel); ours in
# chunks of 1,024 positions x the whole vocabulary, scoring only the labelled positions.
_LONG_SFT = ("multi-turn conversations of demo exchanges filled to <= max_length tokens, every assistant turn trained; "
             "TRL's chunked LM head scores every position on CPU, ours only the trained ones")
_LONG_DPO = ("long multi-turn prompts filled so each pair's longer sequence is <= max_length tokens; " + _SHARED
             + "; TRL's chunked LM head scores every position of both rows on CPU, ours only the replies' positions")
# Activation checkpointing: both sides off (the plain rows, TRL's default turned off) or both on (the _ckpt rows:
# TRL's activation_checkpointing=True, our model.gradient_checkpointing=true; non-reentrant on both).
_CHECKPOINTING = [("", {}), ("_ckpt", {"gradient_checkpointing": True})]

# Demo records are 20-110 tokens, so max_length 256 truncates nothing (the tokenized data is checked).
# RL: GRPO answers 2 prompts x 4 = 8 replies per step (one optimiser step: mini batch = the whole
# rollout, one pass, as TRL with steps_per_generation=1, num_iterations=1); PPO answers 4 prompts and
# takes ppo_epochs x (4 / mini_batch_size) = 4 optimiser steps per iteration.
WORKLOADS = {w.name: w for w in [
    Workload("sft", "sft", "sft_train", "trl", batch_size=8, lr=2e-5, steps=20),
    Workload("sft_packed", "sft", "sft_train", "trl", batch_size=2, lr=2e-5, steps=20, options={"packing": True},
             caveat="the packers differ, so a step's rows hold different conversations and token counts: ours packs "
                    "greedily in shuffled order into padded rows with a block-diagonal mask, TRL packs best-fit-"
                    "decreasing into one padding-free row with restarting position_ids; compare tokens/s and samples/s"),
    # rm, dpo_precompute, dpo_copy: one row per sequence (datamodule.share_prompt=false), as TRL forwards them.
    Workload("rm", "rm", "pref_train", "trl", batch_size=8, lr=1e-5, steps=20, options={"share_prompt": "false"}),
    Workload("dpo_precompute", "dpo", "pref_train", "trl", batch_size=8, lr=5e-6, steps=20,
             options={"ref": "precompute", "beta": 0.1, "share_prompt": "false"}, caveat=_REFERENCE_PASS),
    Workload("dpo_copy", "dpo", "pref_train", "trl", batch_size=8, lr=5e-6, steps=20,
             options={"ref": "copy", "beta": 0.1, "share_prompt": "false"}, flops_per_param_token=8),
    # The same with each pair's prompt forwarded once (share_prompt=auto, which is on for these pairs), on the
    # demo pairs and on pairs with long multi-turn prompts. tokens/s counts every pair's tokens as TRL's rows hold them.
    Workload("rm_shared", "rm", "pref_train", "trl", batch_size=8, lr=1e-5, steps=20, options={"share_prompt": "auto"},
             caveat=_SHARED),
    Workload("dpo_shared", "dpo", "pref_train", "trl", batch_size=8, lr=5e-6, steps=20,
             options={"ref": "precompute", "beta": 0.1, "share_prompt": "auto"}, caveat=_SHARED),
    Workload("rm_long", "rm", "pref_long", "trl", batch_size=8, lr=1e-5, steps=10, max_length=512,
             options={"share_prompt": "auto"}, caveat=_SHARED),
    Workload("dpo_long", "dpo", "pref_long", "trl", batch_size=8, lr=5e-6, steps=10, max_length=512,
             options={"ref": "precompute", "beta": 0.1, "share_prompt": "auto"}, caveat=_SHARED),
    # Long context: sequences of up to 2,048 tokens, filled from the demo records (every sequence within max_length,
    # nothing truncated, checked). Gradient checkpointing off on both sides, as above; the _ckpt rows turn it on for both.
    *[Workload(f"sft_2k{suffix}", "sft", "sft_filled", "trl", batch_size=2, lr=2e-5, steps=5, max_length=2048,
               options=ckpt, caveat=_LONG_SFT, in_default_run=not ckpt) for suffix, ckpt in _CHECKPOINTING],
    *[Workload(f"dpo_2k{suffix}", "dpo", "pref_filled", "trl", batch_size=1, lr=5e-6, steps=5, max_length=2048,
               options={"ref": "precompute", "beta": 0.1, "share_prompt": "auto", **ckpt}, caveat=_LONG_DPO,
               in_default_run=not ckpt)
      for suffix, ckpt in _CHECKPOINTING],
    Workload("grpo", "grpo", "rl_train", "trl", batch_size=2, lr=1e-6, steps=10,
             options={"num_generations": 4, "max_new_tokens": 32, "temperature": 1.0},
             caveat="each side samples its own replies, so reply lengths (tokens/step) differ; compare tokens/s",
             flops_per_param_token=None),
    # The same with our replies drawn by vLLM (rollout.backend=vllm: a server beside the trainer, sent the weights
    # after each optimiser step); TRL's side is as in `grpo` (its vLLM modes need CUDA). Needs `make vllm`.
    Workload("grpo_vllm", "grpo", "rl_train", "trl", batch_size=2, lr=1e-6, steps=10,
             options={"num_generations": 4, "max_new_tokens": 32, "temperature": 1.0, "backend": "vllm"},
             caveat="ours samples with vLLM (rollout.backend=vllm; its start is in the warm-up steps, each weight sync "
                    "in the timed step but not in rollout tok/s), TRL with HF generate; each side samples its own "
                    "replies, so compare tokens/s",
             flops_per_param_token=None),
    Workload("ppo", "ppo", "rl_train", "naive", batch_size=4, lr=1e-5, steps=5,
             options={"mini_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 32, "temperature": 0.7,
                      "kl_coef": 0.05, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
                      "gamma": 1.0, "lam": 0.95, "reward_clip": 10.0},
             caveat="TRL 1.16 has no PPOTrainer: the baseline is bench/naive_ppo.py (no KV cache, one sequence per "
                    "forward pass); each side samples its own replies",
             flops_per_param_token=None),
]}

# The optimiser both sides use: AdamW, constant lr (no warm-up, no decay), as llm_stages' defaults otherwise;
# fused: one kernel per update, llm_stages' default and TRL's (adamw_torch_fused on torch >= 2.8).
OPTIM = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0, "fused": True}


def optimiser_steps(w: Workload, steps: int) -> int:
    """Optimiser steps of `steps` timed units: a unit is one optimiser step, for RL one iteration."""
    if w.stage == "ppo":
        return steps * w.options["ppo_epochs"] * (w.batch_size // w.options["mini_batch_size"])
    return steps


def our_overrides(w: Workload, *, checkpoint: str, data_path: str, cache_dir: str, log_dir: str, total_steps: int,
                  trainer: str, seed: int) -> list[str]:
    """`python -m llm_stages` overrides for `total_steps` units of workload `w`: the shared checkpoint
    and data, nothing evaluated, checkpointed, exported or logged."""
    overrides = [
        f"stage={w.stage}", "model=local", f"model.path={checkpoint}",
        "data=file", f"data.path={data_path}", "data.val_path=null", "data.val_ratio=0", f"data.cache_dir={cache_dir}",
        f"trainer={trainer}", f"trainer.max_steps={optimiser_steps(w, total_steps)}", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=none", "callbacks=none", "export.enabled=false", "validate_before_fit=false",
        f"paths.log_dir={log_dir}", f"seed={seed}",
        f"optim.lr={w.lr}", "optim.warmup_steps=0", "optim.scheduler=constant",
        f"optim.betas=[{OPTIM['betas'][0]},{OPTIM['betas'][1]}]", f"optim.eps={OPTIM['eps']}",
        f"optim.weight_decay={OPTIM['weight_decay']}", f"optim.max_grad_norm={OPTIM['max_grad_norm']}",
        f"optim.fused={str(OPTIM['fused']).lower()}",
        f"datamodule.batch_size={w.batch_size}",
    ]
    o = w.options
    if o.get("gradient_checkpointing"):
        overrides.append("model.gradient_checkpointing=true")
    if w.stage == "sft":
        overrides += [f"datamodule.max_length={w.max_length}", f"datamodule.packing={str(o.get('packing', False)).lower()}"]
    elif w.stage == "rm":  # prompts take at most half (demo prompts are far shorter: nothing is cut)
        overrides += [f"datamodule.max_length={w.max_length}", f"datamodule.max_prompt_length={w.max_length // 2}",
                      f"datamodule.share_prompt={o.get('share_prompt', 'auto')}"]
    elif w.stage == "dpo":
        # The precompute pass scores in batches of val_batch_size; TRL's in precompute_ref_batch_size (set equal).
        overrides += [f"datamodule.max_length={w.max_length}", f"datamodule.max_prompt_length={w.max_length // 2}",
                      f"datamodule.val_batch_size={w.batch_size}", f"datamodule.share_prompt={o.get('share_prompt', 'auto')}",
                      f"module.ref={o['ref']}", "loss=sigmoid", f"loss.beta={o['beta']}"]
    elif w.stage == "grpo":
        overrides += [f"module.num_generations={o['num_generations']}",
                      f"module.mini_batch_size={w.batch_size * o['num_generations']}", "module.ppo_epochs=1",
                      f"rollout.generation.max_new_tokens={o['max_new_tokens']}",
                      f"rollout.generation.temperature={o['temperature']}", "module.log_samples_every=0"]
        if o.get("backend"):
            overrides += [f"rollout.backend={o['backend']}"]
    elif w.stage == "ppo":
        overrides += [f"module.mini_batch_size={o['mini_batch_size']}", f"module.ppo_epochs={o['ppo_epochs']}",
                      f"rollout.generation.max_new_tokens={o['max_new_tokens']}",
                      f"rollout.generation.temperature={o['temperature']}", "module.log_samples_every=0",
                      f"module.kl_coef={o['kl_coef']}", f"module.cliprange={o['cliprange']}",
                      f"module.cliprange_value={o['cliprange_value']}", f"module.vf_coef={o['vf_coef']}",
                      f"module.gamma={o['gamma']}", f"module.lam={o['lam']}", f"module.reward_clip={o['reward_clip']}",
                      # The same rule reward the naive baseline and TRL's GRPO get.
                      "+rollout.rewards.correct={weight: 1.0, fn: {_target_: llm_stages.rollout.rewards.answer_match, _partial_: true}}"]
    return overrides
