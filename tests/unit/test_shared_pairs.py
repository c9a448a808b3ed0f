"""Prefix-shared pairs (llm_stages.data.kinds.shared_pair, llm_stages.stages.pair_scoring): the mask,
positions and read-out indices of hand-written rows, and equality with one row per sequence —
per-sequence log-probs, rewards, the DPO and RM losses and their gradients — on a tiny model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.data.kinds.pair import PairExample, collate_pairs, render_pair
from llm_stages.data.kinds.shared_pair import (collate_shared_pairs, decide_share_prompt, pack_rows, prompt_saving,
                                               shared_prefix_length)
from llm_stages.data.render import Example
from llm_stages.errors import ConfigError
from llm_stages.losses import dpo_loss
from llm_stages.losses.reward import pairwise_reward_loss
from llm_stages.stages.pair_scoring import sequence_scores, shared_prompt_unsupported, shared_reward_scores
from llm_stages.models import reward_scores

X = -100
PAD = 0


def _pair(chosen, chosen_labels, rejected, rejected_labels, index=0):
    return PairExample(Example(chosen, chosen_labels), Example(rejected, rejected_labels), index)


# prompt [1, 2, 3]; chosen reply [4, 5]; rejected reply [6]
A = _pair([1, 2, 3, 4, 5], [X, X, X, 4, 5], [1, 2, 3, 6], [X, X, X, 6], index=0)
# prompt [7]; replies [8] and [9]
B = _pair([7, 8], [X, 8], [7, 9], [X, 9], index=1)
C = _pair([7, 8], [X, 8], [7, 9], [X, 9], index=2)


def test_a_pair_is_one_row_whose_mask_hides_chosen_from_rejected_and_whose_positions_restart():
    batch = collate_shared_pairs([A], PAD)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]  # rejected restarts right after the prompt
    assert batch.attention_mask.shape == (1, 1, 6, 6) and batch.attention_mask.dtype == torch.bool
    expected = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],  # chosen: prompt + chosen, causal
                [1, 1, 1, 1, 1, 0],
                [1, 1, 1, 0, 0, 1]]  # rejected: prompt + itself, never chosen
    assert batch.attention_mask[0, 0].int().tolist() == expected
    assert batch.labels.tolist() == [[X, X, X, 4, 5, 6]]
    # The first rejected token is predicted by the prompt's last position (2), not by chosen's last (4).
    assert batch.predictor.tolist() == [[-1, 0, 1, 2, 3, 2]]
    assert batch.sequence.tolist() == [[-1, -1, -1, 0, 0, 1]]  # chosen of pair 0 -> 0, its rejected -> 1
    # Rewards read where each sequence's own row is read: its last token (chosen 5 at 4, rejected 6 at 5).
    assert batch.reward_row.tolist() == [0, 0] and batch.reward_position.tolist() == [4, 5]
    assert batch.num_pairs == 1 and batch.num_tokens == 9 and int(batch.real_tokens.sum()) == 6
    assert batch.reply_lengths.tolist() == [2, 1]


def test_pairs_pack_into_rows_no_longer_than_the_longest_pair_with_a_block_diagonal_mask():
    assert pack_rows([6, 3, 3], 6) == [[0], [1, 2]]
    assert pack_rows([2, 5, 3, 4], 6) == [[0, 3], [1], [2]]  # first-fit decreasing: 5 | 4 + 2 | 3
    batch = collate_shared_pairs([A, B, C], PAD)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 7, 8, 9]]
    assert batch.position_ids[1].tolist() == [0, 1, 1, 0, 1, 1]
    b = [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    z = [[0, 0, 0]] * 3
    assert batch.attention_mask[1, 0].int().tolist() == [r + s for r, s in zip(b, z)] + [s + r for r, s in zip(b, z)]
    assert batch.predictor[1].tolist() == [-1, 0, 0, -1, 3, 3]
    # Sequences: chosen of pairs 0, 1, 2 are 0, 1, 2; their rejected 3, 4, 5.
    assert batch.sequence[1].tolist() == [-1, 1, 4, -1, 2, 5]
    assert batch.reward_row.tolist() == [0, 1, 1, 0, 1, 1] and batch.reward_position.tolist() == [4, 1, 4, 5, 2, 5]
    unpacked = collate_shared_pairs([A, B], PAD, pack=False)
    assert unpacked.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, PAD, PAD, PAD]]
    # Padding attends to itself only (no empty softmax rows).
    assert unpacked.attention_mask[1, 0, 3:].int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_the_shared_prefix_stops_at_the_first_difference_or_trained_token():
    assert shared_prefix_length(A) == 3
    boundary = _pair([1, 2, 3, 4], [X, X, 3, 4], [1, 2, 5], [X, X, X])  # a label starts inside the common ids
    assert shared_prefix_length(boundary) == 2
    assert shared_prefix_length(_pair([1, 9, 4], [X, X, 4], [1, 8, 5], [X, X, 5])) == 1


def test_share_prompt_auto_is_on_when_the_prompts_save_enough_tokens():
    long_prompt = _pair([1] * 30 + [4], [X] * 30 + [4], [1] * 30 + [5], [X] * 30 + [5])  # saves 30 of 62
    short_prompt = _pair([1, 4, 4, 4, 4], [X, 4, 4, 4, 4], [1, 5, 5, 5, 5], [X, 5, 5, 5, 5])  # saves 1 of 10
    assert prompt_saving([long_prompt]) == pytest.approx(30 / 62)
    assert prompt_saving([short_prompt]) == pytest.approx(0.1)
    assert decide_share_prompt("auto", [long_prompt], 0.2)[0] is True
    assert decide_share_prompt("auto", [short_prompt], 0.2)[0] is False
    assert decide_share_prompt("auto", [long_prompt, short_prompt], 0.2)[0] is True  # 31 of 72
    assert decide_share_prompt("true", [short_prompt], 0.2)[0] is True
    assert decide_share_prompt("false", [long_prompt], 0.2)[0] is False


@pytest.fixture(scope="module")
def tiny():
    from llm_stages.data.render import ensure_chat_template
    from llm_stages.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(OmegaConf.create({"name": "tiny"}))
    ensure_chat_template(tokenizer)
    cfg = OmegaConf.create({"name": "tiny", "init": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 2, "num_key_value_heads": 1}})
    torch.manual_seed(0)
    policy = load_model(cfg, tokenizer)
    torch.manual_seed(1)
    reward_model = load_model(cfg, tokenizer, head="reward")
    prompts = [[{"role": "user", "content": "What is 12+7?"}],
               [{"role": "user", "content": "a longer prompt with more words in it"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now?"}],
               [{"role": "user", "content": "x"}]]
    replies = [("19 is the answer", "21"), ("fine", "no, not fine at all"), ("", "an empty chosen reply")]
    pairs = [render_pair(tokenizer, p, c, r)._replace(index=i) for i, (p, (c, r)) in enumerate(zip(prompts, replies))]
    return tokenizer, policy, reward_model, pairs


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_log_probs_rewards_losses_and_gradients_equal_one_row_per_sequence(tiny, attention):
    tokenizer, policy, reward_model, pairs = tiny
    for model in (policy, reward_model):
        model.config._attn_implementation = attention
    plain = collate_pairs(pairs, tokenizer.pad_token_id)
    n = len(pairs)
    ref = torch.linspace(-40, -30, 2 * n)  # any reference log-probs
    results = {}
    for name, batch in [("plain", plain), ("shared", collate_shared_pairs(pairs, tokenizer.pad_token_id, pack=False)),
                        ("packed", collate_shared_pairs(pairs, tokenizer.pad_token_id, pack=True))]:
        logps, n_tokens, mean_logits = sequence_scores(policy, batch)
        losses = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], loss_type="sigmoid", beta=0.1)[0]
        losses.sum().backward()
        dpo_grads = _grads(policy)
        rewards = (reward_scores(reward_model, batch.input_ids, batch.attention_mask) if name == "plain"
                   else shared_reward_scores(reward_model, batch))
        pairwise_reward_loss(rewards[:n], rewards[n:], margin=0.0).sum().backward()
        results[name] = (logps, n_tokens, mean_logits, losses, dpo_grads, rewards, _grads(reward_model))
    assert results["shared"][0].shape == (2 * n,) and results["packed"][0].shape == (2 * n,)
    assert results["plain"][1].tolist() == [int(t) for t in (plain.labels[:, 1:] != -100).sum(-1)]
    for name in ("shared", "packed"):
        for ours, theirs in zip(results[name], results["plain"]):
            if isinstance(ours, dict):  # gradients
                assert ours.keys() == theirs.keys() and ours
                for key in ours:
                    torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-4)
            else:
                torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-5, rtol=1e-5)
    for model in (policy, reward_model):
        model.config._attn_implementation = "sdpa"


def test_models_that_ignore_4d_masks_are_named_and_an_explicit_true_is_refused(tiny, tmp_path):
    from llm_stages.data.datamodule import PairDataModule

    tokenizer, policy, reward_model, _ = tiny
    assert shared_prompt_unsupported(policy, reward_head=False, sharded=False) is None
    assert shared_prompt_unsupported(reward_model, reward_head=True, sharded=False) is None
    assert "sharded" in shared_prompt_unsupported(reward_model, reward_head=True, sharded=True)
    policy.config._attn_implementation = "flash_attention_2"
    try:
        assert "ignores 4-D attention masks" in shared_prompt_unsupported(policy, reward_head=False, sharded=False)
    finally:
        policy.config._attn_implementation = "sdpa"
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a question with some words", "chosen": "yes", "rejected": "no"}\n' * 2)
    data = OmegaConf.create({"path": str(path), "val_ratio": 0.0, "cache_dir": None})
    auto = PairDataModule(data, tokenizer, batch_size=1)
    auto.setup()
    assert auto.shares_prompt is True
    auto.stop_sharing("a reason")
    auto.setup()  # a second setup (fit after validate) keeps the decision
    assert auto.shares_prompt is False
    forced = PairDataModule(data, tokenizer, batch_size=1, share_prompt=True)
    forced.setup()
    with pytest.raises(ConfigError, match="share_prompt=true cannot be used here: a reason"):
        forced.stop_sharing("a reason")
    with pytest.raises(ConfigError, match="share_prompt=maybe"):
        PairDataModule(data, tokenizer, share_prompt="maybe")
