"""Rollout buffer iteration and rule reward functions."""

import torch

from llm_stages.data.answers import final_answer
from llm_stages.rollout.rewards import answer_match, demo_equation, format_match
from llm_stages.rollout.rollout import RolloutBuffer, Trajectory


def trajectory(n: int, width: int = 3) -> Trajectory:
    ids = torch.arange(n)[:, None].expand(n, width).clone()  # row i holds i everywhere: identifies the experience
    ones = torch.ones(n, width)
    return Trajectory(ids, ones.long(), ids, ones.long(), ones, ones, ones, ones, ones, ones, ones, torch.arange(n).float(),
                      torch.zeros(n, width, dtype=torch.long))


def test_minibatches_cover_every_experience_once_per_epoch():
    buffer = RolloutBuffer(trajectory(12))
    orders = []
    for epoch in range(3):
        seen = [int(i) for mb in buffer.minibatches(4, seed=7, epoch=epoch) for i in mb.query[:, 0]]
        assert sorted(seen) == list(range(12))  # each experience exactly once
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    again = [int(i) for mb in buffer.minibatches(4, seed=7, epoch=0) for i in mb.query[:, 0]]
    assert again == orders[0]  # same seed and epoch: same order (a resumed run replays it)
    for mb in buffer.minibatches(4, seed=7, epoch=0):  # rows stay whole across fields
        assert torch.equal(mb.query[:, 0].float(), mb.scores)


def test_buffer_refuses_an_uneven_split():
    buffer = RolloutBuffer(trajectory(6))
    try:
        list(buffer.minibatches(4, seed=0))
    except ValueError as e:
        assert "6 experiences" in str(e)
    else:
        raise AssertionError("6 experiences must not split into minibatches of 4")


def test_final_answer():
    assert final_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1,234"
    assert final_answer(r"So the answer is \boxed{42}. Check: 41 + 1") == "42"
    assert final_answer("first 3, then 7.") == "first 3, then 7"  # no marker: the whole reply, read by math-verify


def test_answer_match():
    completions = ["12 + 30 = 42", "#### 42.0", r"\boxed{41}", "forty-two", "1,000"]
    assert answer_match(completions, answers=["42", "42", "42", "42", "1000"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert answer_match(["42"], answers=[None]) == [0.0]


def test_format_match():
    pattern = r"-?\d+ [+-] -?\d+ = -?\d+"
    assert format_match(["12 + 30 = 42", " 5 - 7 = -2\n", "12 + 30 is 42"], pattern=pattern) == [1.0, 1.0, 0.0]


def test_demo_equation_partial_credit():
    prompts = ["What is 12 + 30?", "What is 12 + 30?", "What is 12 + 30?", "Calculate 8 plus 67.", "4 - 17 = ?"]
    completions = ["12 + 30 = 41", "12 - 31 = -19", "twelve", "8 + 67 = 75", "4 - 71 = -67"]
    # exact restatement 1; only 12 right 1/3; wrong shape 0; words for the operator 1; 4 and - right 2/3
    assert demo_equation(completions, prompts=prompts) == [1.0, 1 / 3, 0.0, 1.0, 2 / 3]
