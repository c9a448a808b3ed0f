"""Fidelity to TRL 1.16 on real data (a slice of LLaMA-Factory's dpo_en_demo, multi-turn prompts
with earlier assistant turns): the SFT token mask of prompt/completion records, DPO's chosen and
rejected log-probs and the RM loss, at identical weights, each against TRL's own trainer
(its dataset preparation, collator and scoring code). Skipped when /work/shared/data is absent."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from llm_stages.data.datamodule import PairDataModule, SFTDataModule
from llm_stages.data.render import IGNORE_INDEX
from llm_stages.models import reward_scores
from llm_stages.stages.pair_scoring import sequence_scores
from tests.conftest import SHARED_DATA

pytest.importorskip("trl")
DPO_DEMO = SHARED_DATA / "llamafactory" / "dpo_en_demo.json"
pytestmark = pytest.mark.skipif(not DPO_DEMO.exists(), reason=f"{DPO_DEMO} is absent")

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
N_RECORDS = 12  # the first records of the file, five of them with earlier assistant turns in the prompt


def _messages(turns) -> list[dict]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """TRL's conversational layout of the slice: prompt messages, then the chosen / rejected reply."""
    rows = json.loads(DPO_DEMO.read_text(encoding="utf-8"))[:N_RECORDS]
    return [{"prompt": _messages(r["conversations"]), "chosen": _messages([r["chosen"]]),
             "rejected": _messages([r["rejected"]])} for r in rows]


def _write(tmp_path, rows) -> OmegaConf:
    path = tmp_path / "slice.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.0, "format": "auto",
                             "system_prompt": None, "demo": None})


def _config(tokenizer, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


def _trl_args(config_class, tmp_path, **extra):
    return config_class(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                        max_length=None, dataset_num_proc=None, model_init_kwargs=None, **extra)


def _quiet_trl():
    logging.getLogger("trl").setLevel(logging.ERROR)


# --- SFT: the token mask of prompt/completion records ----------------------------------------------

@pytest.mark.slow
def test_sft_prompt_completion_mask_equals_trls(tmp_path, records, tokenizer):
    """Completion only (TRL's `completion_only_loss`, our default): the same tokens and the same
    labels as SFTTrainer's prepared dataset, record by record; the assistant turns inside the
    prompts are context, not trained."""
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    _quiet_trl()
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]
    trainer = SFTTrainer(Qwen2ForCausalLM(_config(tokenizer)), args=_trl_args(SFTConfig, tmp_path),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    theirs = trainer.train_dataset
    dm = SFTDataModule(_write(tmp_path, rows), tokenizer, batch_size=1, max_length=100_000)
    dm.setup()
    assert len(dm.train_set) == len(theirs) == N_RECORDS
    for ours, trl_row in zip(dm.train_set, theirs):
        assert ours.input_ids == trl_row["input_ids"]
        assert ours.labels == trl_row["labels"]

    # The other behaviour, on request: the prompt's assistant turns are trained too.
    everything = SFTDataModule(_write(tmp_path, rows), tokenizer, batch_size=1, max_length=100_000,
                               completion_only_loss=False)
    everything.setup()
    trained = [sum(label != IGNORE_INDEX for label in e.labels) for e in dm.train_set]
    trained_all = [sum(label != IGNORE_INDEX for label in e.labels) for e in everything.train_set]
    multi_turn = [i for i, r in enumerate(rows) if any(m["role"] == "assistant" for m in r["prompt"])]
    assert multi_turn and all(trained_all[i] > trained[i] for i in multi_turn)
    assert all(trained_all[i] == trained[i] for i in range(len(rows)) if i not in multi_turn)
