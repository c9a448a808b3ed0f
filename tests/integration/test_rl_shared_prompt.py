"""RL's two prompt-once paths: the decode loop (each prompt forwarded once, its KV cache copied per
reply; tokens drawn by inverse CDF) and the update's `[prompt, reply_1, ..., reply_k]` rows. Each
must give what one row per reply gives: the same greedy replies, the same log-probs, entropies and
gradients (to float rounding), and draws from the distribution the loss models."""

from __future__ import annotations

import pytest
import torch

from llm_stages.checks import check_config
from llm_stages.errors import ConfigError
from llm_stages.rollout.decode import Drawing, decode, draw
from llm_stages.rollout.rollout import Trajectory
from llm_stages.rollout.shared_prompt import prompt_groups, share_prompts, token_saving
from llm_stages.train import build
from tests.integration.test_rl_stages import GRPO


@pytest.fixture(scope="module")
def grpo(make_cfg_module):
    module, datamodule = build(make_cfg_module(*GRPO, "rollout.generation.max_new_tokens=12"))
    datamodule.setup("fit")
    [prompts] = next(iter(datamodule.train_dataloader()))
    return module, prompts


@pytest.fixture(scope="module")
def make_cfg_module(tmp_path_factory, demo_dir):
    from llm_stages.config import compose

    tmp = tmp_path_factory.mktemp("shared_prompt")
    return lambda *overrides: compose([f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={tmp}/runs", "debug=tiny",
                                       *overrides], output_dir=str(tmp / "run"))


def _trajectory(sample) -> Trajectory:
    zeros = torch.zeros(sample.response.shape)
    return Trajectory.from_sample(sample, logprobs=zeros, ref_logprobs=zeros, advantages=zeros, scores=zeros[:, 0])


def test_a_prompt_forwarded_once_gives_the_same_greedy_replies_and_logprobs(grpo):
    module, prompts = grpo
    model = module.model.eval()
    ids, mask = prompts.input_ids, prompts.attention_mask
    assert (mask == 0).any()  # left padding is exercised
    greedy = dict(repeats=3, max_new_tokens=10, drawing=Drawing(False), eos=module.rollout.sampler.eos_ids, pad_token_id=0)
    shared, shared_lp = decode(model, ids, mask, **greedy)
    each, each_lp = decode(model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), **{**greedy, "repeats": 1})
    assert torch.equal(shared, each)
    torch.testing.assert_close(shared_lp, each_lp, atol=1e-5, rtol=0)
    # ... and what generate() draws greedily, also where replies end early (an EOS each reply reaches:
    # ended replies leave the batch, the others go on).
    eos = sorted({int(shared[0, 2]), int(shared[3, 5])})
    ended, ended_lp = decode(model, ids, mask, **{**greedy, "eos": eos})
    generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                               eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    assert ended.shape[1] < 10 or (ended == 0).any()
    assert torch.equal(ended[::3], generated)
    assert torch.equal(ended_lp != 0, torch.cat([ended.new_ones(ended.shape[0], 1), (~torch.isin(ended, torch.tensor(eos)))[:, :-1]], 1).cumprod(1).bool())
    torch.testing.assert_close(ended_lp[ended_lp != 0], shared_lp[:, :ended.shape[1]][ended_lp != 0], atol=1e-5, rtol=0)


def test_inverse_cdf_draws_from_the_truncated_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0]]).repeat(40_000, 1)
    token, logprob = draw(logits, Drawing(True, temperature=0.8))
    expected = torch.softmax(logits[0] / 0.8, -1)
    counts = torch.bincount(token, minlength=6) / token.numel()
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)  # 40k draws: std <= 0.0025
    torch.testing.assert_close(logprob, expected.log()[token])
    token, logprob = draw(logits, Drawing(True, temperature=1.0, top_k=2))
    assert set(token.tolist()) == {0, 1}
    torch.testing.assert_close(logprob, torch.log_softmax(logits[0], -1)[token])  # the loss's log-prob: untruncated
    token, _ = draw(logits, Drawing(True, temperature=1.0, top_p=0.5))  # p(0) = 0.56 >= 0.5
    assert set(token.tolist()) == {0}


def test_shared_prompt_rows_give_the_one_row_logprobs_entropy_and_gradients(grpo):
    module, prompts = grpo
    model = module.model.train()
    sample = module.rollout.sampler.sample(model, prompts, repeats=4, generation=module.generation, seed=5)
    # An episode-like reply: environment tokens inside the reply (read, not sampled) and a hole in the mask.
    observation = torch.zeros_like(sample.observation_mask)
    observation[1, 2:4] = 1
    response_mask = sample.response_mask.clone()
    response_mask[1, 2:4] = 0
    response_mask[2, 3] = 0  # a token nobody attends to
    sample = sample._replace(response_mask=response_mask, observation_mask=observation)
    trajectory = _trajectory(sample)
    groups = prompt_groups(trajectory.query, trajectory.query_mask)
    assert [len(g) for g in groups] == [4] * prompts.input_ids.shape[0]
    seen = trajectory.response_mask | trajectory.observation_mask
    assert token_saving(trajectory.query_mask, seen, groups) > 0.2

    results = {}
    for setting in ("true", "false"):
        module.share_prompt = setting
        model.zero_grad()
        logprobs, entropy = module.response_logprobs(model, trajectory, with_entropy=True)
        ((logprobs * sample.response_mask).sum() + (entropy * sample.response_mask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[setting] = (logprobs * seen, entropy * seen, grads)
    module.share_prompt = "auto"
    (lp, ent, grads), (lp1, ent1, grads1) = results["true"], results["false"]
    torch.testing.assert_close(lp, lp1, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent1, atol=1e-5, rtol=0)
    assert grads.keys() == grads1.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_share_prompts_lays_out_each_group_once():
    query = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9]])
    query_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])
    response = torch.tensor([[10, 11, 0], [12, 0, 0], [13, 14, 15]])
    seen = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    groups = prompt_groups(query, query_mask)
    assert groups == [[0, 1], [2]]
    rows = share_prompts(query, query_mask, response, seen, groups)
    assert rows.input_ids.tolist() == [[5, 6, 10, 11, 12, 0], [7, 8, 9, 13, 14, 15]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 3, 4, 5]]
    mask = rows.attention_mask[0, 0].int().tolist()
    assert mask[4] == [1, 1, 0, 0, 1, 0]  # the second reply sees the prompt and itself, not the first reply
    assert mask[5] == [1, 1, 0, 0, 0, 0]  # padding: the prompt (never an empty row)
    assert rows.source_column.tolist() == [1, 2, 1, 2, 3, 4] and rows.source_row.tolist() == [0, 0, 0, 1, 1, 1]
    assert rows.index.tolist() == [0, 1, 3, 6, 7, 8] and rows.tokens.tolist() == [10, 11, 12, 13, 14, 15]
    assert int(rows.attention_mask[:, 0].diagonal(dim1=1, dim2=2).sum()) == 11  # real tokens forwarded: 2 + 2 + 1, 3 + 3
    assert token_saving(query_mask, seen, groups) == pytest.approx(1 - 11 / 13)  # of 13 in one row per reply


def test_share_prompt_setting_is_checked(make_cfg_module):
    with pytest.raises(ConfigError, match="module.share_prompt=sometimes"):
        build(make_cfg_module(*GRPO, "module.share_prompt=sometimes"))
    with pytest.raises(ConfigError, match=r"module.share_prompt_min_saving=2: expected a number in \[0, 1\]"):
        check_config(make_cfg_module(*GRPO, "module.share_prompt_min_saving=2"))
