"""Training mechanics on the tiny model: exact loss weighting, updates, resume, export."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_stages.data.collate import MicroBatches, collate_causal
from llm_stages.training.export import export_hf
from llm_stages.losses import token_cross_entropy
from llm_stages.models import load_tokenizer
from llm_stages.train import build as _build
from llm_stages.train import train


class GradCapture(L.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _first_step_grads(cfg):
    module, datamodule = _build(cfg)
    capture = GradCapture()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[capture], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return capture.grads[0], module, datamodule


def test_grad_accumulation_2x4_equals_1x8_and_a_full_batch_token_mean(make_cfg):
    common = ["stage=sft", "optim.max_grad_norm=null"]
    grads_accum, _, _ = _first_step_grads(make_cfg(*common, "datamodule.batch_size=4", "datamodule.grad_accum=2"))
    grads_full, _, datamodule = _first_step_grads(make_cfg(*common, "datamodule.batch_size=8", "datamodule.grad_accum=1"))
    assert grads_accum.keys() == grads_full.keys() and grads_full
    for name in grads_full:
        torch.testing.assert_close(grads_accum[name], grads_full[name], atol=1e-5, rtol=1e-4)

    # Reference: the token-mean loss of the same 8 examples in one hand-written forward pass.
    module, _ = _build(make_cfg(*common))
    sampler_batch = datamodule.train_dataloader().batch_sampler.batches(0)[0]
    batch = collate_causal([datamodule.train_set[i] for i in sampler_batch], datamodule.tokenizer.pad_token_id)
    module.model.train()
    logits = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False).logits  # every position's logits
    loss_sum, n_tokens = token_cross_entropy(logits, batch.labels)
    (loss_sum / n_tokens).backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads_accum[name], p.grad, atol=1e-5, rtol=1e-4)
    # The two micro-batches differ in token counts, so a mean of micro-batch means would not have matched.
    halves = MicroBatches(datamodule.collate_one, 4)([datamodule.train_set[i] for i in sampler_batch])
    counts = [int((b.labels[:, 1:] != -100).sum()) for b in halves]
    assert counts[0] != counts[1]


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_micro_batches_split_by_length_give_the_same_step_as_one_padded_batch(make_cfg, stage):
    common = [f"stage={stage}", "optim.max_grad_norm=null", "datamodule.batch_size=8"]
    grads_split, _, datamodule = _first_step_grads(make_cfg(*common, "datamodule.length_groups=4",
                                                            "datamodule.length_group_cost=0"))
    grads_one, _, _ = _first_step_grads(make_cfg(*common, "datamodule.length_groups=1"))
    assert grads_split.keys() == grads_one.keys() and grads_one
    for name in grads_one:
        torch.testing.assert_close(grads_split[name], grads_one[name], atol=1e-5, rtol=1e-4)
    step = next(iter(datamodule.train_dataloader()))
    assert len(step) > 1 and len({b.input_ids.shape[1] for b in step}) > 1  # the batch really was split


def test_parameters_change_after_one_step(make_cfg):
    cfg = make_cfg("stage=sft", "trainer.max_steps=1")
    module, datamodule = _build(cfg)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    changed = [n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())]
    assert set(changed) == set(before), f"unchanged: {set(before) - set(changed)}"


def test_export_then_reload_gives_identical_logits(tmp_path, tokenizer, make_cfg):
    cfg = make_cfg("stage=sft")
    module, _ = _build(cfg)
    out = export_hf(module.model, tokenizer, tmp_path / "export")
    assert not list(tmp_path.glob(".export.tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("What is 12 + 30?")["input_ids"]])
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(module.model(ids).logits, reloaded(ids).logits)
    assert load_tokenizer(type(cfg.model)({"path": str(out)})).get_vocab() == tokenizer.get_vocab()


def test_train_resume_gives_identical_next_steps(tmp_path, make_cfg):
    run = ["stage=sft", "trainer.max_steps=4", "trainer.val_check_interval=2", "validate_before_fit=false",
           "callbacks=default", "~callbacks.throughput", "callbacks.model_checkpoint.save_top_k=-1",
           "+callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.monitor=null", "logger=csv"]
    straight = train(make_cfg(*run, output_dir=tmp_path / "straight"))
    ckpt = tmp_path / "straight" / "checkpoints" / "step000002.ckpt"
    assert ckpt.exists()
    resumed = train(make_cfg(*run, f"ckpt_path={ckpt}", output_dir=tmp_path / "resumed"))
    assert resumed["steps"] == straight["steps"] == 4
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    assert resumed["train/loss"] == straight["train/loss"]


def test_sft_with_packing_trains(make_cfg, tmp_path):
    metrics = train(make_cfg("stage=sft", "datamodule.packing=true", "datamodule.max_length=256", "trainer.max_steps=3",
                             "datamodule.batch_size=2", "export.enabled=false", output_dir=tmp_path / "packed"))
    assert metrics["steps"] == 3 and metrics["val/loss"] < metrics["val/loss_before"]
