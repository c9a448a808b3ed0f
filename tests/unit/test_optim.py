import pytest

from llm_stages.optim import lr_factor


def test_warmup_then_cosine_to_floor():
    kw = dict(warmup_steps=4, total_steps=14, scheduler="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(14, **kw) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_factor(5, warmup_steps=0, total_steps=10, scheduler="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(5, warmup_steps=0, total_steps=10, scheduler="constant", min_lr_ratio=0.0) == 1.0
