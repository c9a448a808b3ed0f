"""module.rpo_alpha in KTO: the per-token NLL of each desirable reply, times alpha, added to its loss."""

from __future__ import annotations

import pytest
import torch

from llm_stages.checks import check_config
from llm_stages.errors import ConfigError
from tests.integration.test_training import _build


def test_rpo_alpha_adds_alpha_times_the_desirable_replies_nll(make_cfg):
    losses = {}
    for rpo_alpha in ["null", "0.5"]:
        module, datamodule = _build(make_cfg("stage=kto", "module.ref=copy", f"module.rpo_alpha={rpo_alpha}"))
        datamodule.setup()
        batch = datamodule.collate_one(datamodule.train_set[:8])
        with torch.no_grad():
            losses[rpo_alpha] = module.loss_sum(batch)[0]
            logps, n_tokens, _ = module.score(module.model, batch.completion_rows())
    assert 0 < int(batch.label.sum()) < 8  # both labels in the batch: only the desirable ones add a term
    desirable_nll = -(logps / n_tokens.clamp(min=1))[batch.label]
    torch.testing.assert_close(losses["0.5"] - losses["null"], 0.5 * desirable_nll.sum(), atol=1e-5, rtol=1e-5)


def test_a_negative_rpo_alpha_is_refused_before_loading(make_cfg):
    with pytest.raises(ConfigError, match=r"module.rpo_alpha=-1: expected a number >= 0, or null \(null: no NLL term\)"):
        check_config(make_cfg("stage=kto", "module.rpo_alpha=-1"))
