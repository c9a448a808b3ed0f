"""A naive PPO iteration, the baseline for our stage=ppo (TRL 1.16 has no PPOTrainer).

The same algorithm on the same models — actor from the checkpoint, critic = the checkpoint's
backbone with a fresh scalar head, frozen reference = a copy of the actor, the same rule reward, the
loss functions of llm_stages.losses.rl — written the way a first implementation would be:

- rollout: one prompt at a time, one token at a time, each token from a full forward pass over the
  whole sequence so far (no KV cache, no batching);
- scoring and update: one sequence per forward pass (gradients of a minibatch accumulated, then one
  optimiser step per minibatch), so nothing is padded and nothing is batched.

What it shows is what batching, the KV cache and padded minibatches buy, so rollout tokens/s and
update tokens/s are reported separately.
"""

from __future__ import annotations

import copy
import json
import time

import torch
import torch.nn.functional as F

from bench.clock import StepClock


def _response_logprobs(model, ids: torch.Tensor, n_prompt: int, temperature: float):
    """Log-probs (and the logits they came from) of the reply tokens of one sequence `ids` (1-D)."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, n_prompt - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[n_prompt:, None]).squeeze(-1)


def _values(critic, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """The critic's value at every position that predicts a reply token, as our PPO's `values`."""
    hidden = critic.base_model(input_ids=ids[None], use_cache=False).last_hidden_state[0, n_prompt - 1:-1]
    return critic.score(hidden).squeeze(-1).float()


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([F.pad(r, (0, width - r.numel())) for r in rows])


def run(spec: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from llm_stages.losses.rl import clipped_policy_loss, clipped_value_loss, gae, kl_penalty, shaped_rewards, whiten
    from llm_stages.rollout.rewards import answer_match

    w, o = spec["workload"], spec["workload"]["options"]
    device = torch.device("cuda" if spec["trainer"] == "gpu" else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    actor = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).to(device)
    critic = AutoModelForSequenceClassification.from_pretrained(spec["checkpoint"], num_labels=1,
                                                                dtype=torch.float32).to(device)
    reference = copy.deepcopy(actor).eval().requires_grad_(False)
    actor.train(), critic.train()
    params = [p for m in (actor, critic) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=w["lr"], betas=tuple(spec["optim"]["betas"]), eps=spec["optim"]["eps"],
                                  weight_decay=spec["optim"]["weight_decay"], fused=spec["optim"]["fused"] or None)
    eos = {tokenizer.eos_token_id, *([actor.generation_config.eos_token_id] if isinstance(actor.generation_config.eos_token_id, int)
                                     else actor.generation_config.eos_token_id or [])}
    with open(spec["baseline_rows"]) as f:
        rows = [json.loads(line) for line in f]

    temperature, P, M, E = o["temperature"], w["batch_size"], o["mini_batch_size"], o["ppo_epochs"]
    clock = StepClock()
    for iteration in range(spec["steps"]):
        batch = rows[iteration * P:(iteration + 1) * P]
        clock.begin()
        # 1. Rollout: token by token, full recompute, one prompt at a time.
        started = time.perf_counter()
        sequences, prompt_lengths = [], []
        actor.eval()
        with torch.no_grad(), autocast:
            for row in batch:
                ids = torch.tensor(row["prompt_ids"], device=device)
                prompt_lengths.append(ids.numel())
                for _ in range(o["max_new_tokens"]):
                    logits = actor(input_ids=ids[None], use_cache=False).logits[0, -1].float() / temperature
                    token = torch.multinomial(torch.softmax(logits, -1), 1)
                    ids = torch.cat([ids, token])
                    if token.item() in eos:
                        break
                sequences.append(ids)
        actor.train()
        generation_seconds = time.perf_counter() - started
        responses = [s[n:] for s, n in zip(sequences, prompt_lengths)]

        # 2. Score: rule reward; actor and reference log-probs and critic values, one sequence at a time.
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = torch.tensor(answer_match(completions, answers=[r["answer"] for r in batch]), device=device)
        with torch.no_grad(), autocast:
            old = [_response_logprobs(actor, s, n, temperature) for s, n in zip(sequences, prompt_lengths)]
            ref = [_response_logprobs(reference, s, n, temperature) for s, n in zip(sequences, prompt_lengths)]
            values = [_values(critic, s, n) for s, n in zip(sequences, prompt_lengths)]

        # 3. Advantages, on padded (P, R) tensors with our loss functions (cheap; not what is measured).
        width = max(r.numel() for r in responses)
        mask = _pad([torch.ones(r.numel(), device=device) for r in responses], width)
        old_t, ref_t, values_t = _pad(old, width), _pad(ref, width), _pad(values, width)
        kl = kl_penalty(old_t, ref_t, "k1") * mask
        rewards = shaped_rewards(scores.clamp(-o["reward_clip"], o["reward_clip"]), kl, mask, o["kl_coef"])
        advantages, returns = gae(rewards, values_t, mask, o["gamma"], o["lam"])
        advantages = whiten(advantages, mask)

        # 4. Update: ppo_epochs passes of shuffled minibatches; one sequence per forward/backward.
        started = time.perf_counter()
        for epoch in range(E):
            order = torch.randperm(P).tolist()
            for start in range(0, P, M):
                members = order[start:start + M]
                n_tokens = mask[members].sum().clamp(min=1)
                for i in members:
                    n, length = prompt_lengths[i], responses[i].numel()
                    with autocast:
                        logprobs = _response_logprobs(actor, sequences[i], n, temperature)
                        value = _values(critic, sequences[i], n)
                    policy, _ = clipped_policy_loss(logprobs, old_t[i, :length], advantages[i, :length], o["cliprange"])
                    value_loss, _ = clipped_value_loss(value, values_t[i, :length], returns[i, :length], o["cliprange_value"])
                    ((policy + o["vf_coef"] * value_loss).sum() / n_tokens).backward()
                torch.nn.utils.clip_grad_norm_(params, spec["optim"]["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        update_seconds = time.perf_counter() - started

        generated = sum(r.numel() for r in responses)
        tokens = sum(s.numel() for s in sequences)
        clock.add(tokens=tokens, samples=len(batch), generated_tokens=generated, generation_seconds=generation_seconds,
                  update_seconds=update_seconds, update_tokens=tokens * E)
        clock.end()
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    clock.dump(spec["result_path"], cuda_max_allocated_mb=cuda)
