import pytest

from llm_stages.training.optim import lr_factor


def test_warmup_then_cosine_to_floor():
    kw = dict(warmup_steps=4, total_steps=14, scheduler="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(14, **kw) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_factor(5, warmup_steps=0, total_steps=10, scheduler="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(5, warmup_steps=0, total_steps=10, scheduler="constant", min_lr_ratio=0.0) == 1.0


def test_logged_configs_never_carry_secrets():
    from llm_stages.train import redact_secrets

    config = {"logger": {"wandb": {"api_key": "abc", "project": "p", "token": None}},
              "hub": {"HF_TOKEN": "hf_" + "x" * 30, "path": "runs/x"}, "note": "hf_" + "a" * 34,
              "wandb_key": "0123456789abcdef0123456789abcdef01234567", "lr": 1e-3, "items": ["sk-" + "z" * 30, "ok"],
              "generation": {"max_new_tokens": 64}, "tokenizer": "path/tok", "add_tokens": ["<a>"]}
    redacted = redact_secrets(config)
    assert redacted["logger"]["wandb"] == {"api_key": "***", "project": "p", "token": None}
    assert redacted["hub"] == {"HF_TOKEN": "***", "path": "runs/x"}
    assert redacted["note"] == "***" and redacted["wandb_key"] == "***" and redacted["items"] == ["***", "ok"]
    assert redacted["lr"] == 1e-3
    assert redacted["generation"] == {"max_new_tokens": 64} and redacted["tokenizer"] == "path/tok"
    assert redacted["add_tokens"] == ["<a>"]


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop():
    import torch

    from llm_stages.training.optim import OptimConfig, build_optimizer

    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, fused=fused), 5)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for step in range(5):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            model(x).pow(2).mean().backward()
            optimizer.step(), scheduler.step(), optimizer.zero_grad()
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-6, atol=1e-7)
