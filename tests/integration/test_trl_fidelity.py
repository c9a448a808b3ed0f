"""Fidelity to TRL 1.16 on real data (a slice of LLaMA-Factory's dpo_en_demo, multi-turn prompts
with earlier assistant turns): the SFT token mask of prompt/completion records, DPO's chosen and
rejected log-probs and the RM loss, at identical weights, each against TRL's own trainer
(its dataset preparation, collator and scoring code). Skipped when /work/shared/data is absent."""

from __future__ import annotations

import copy
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
                        dataset_num_proc=None, model_init_kwargs=None, **{"max_length": None, **extra})


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


# --- DPO: chosen and rejected log-probs -------------------------------------------------------------

def _pair_module(tmp_path, records, tokenizer, share_prompt: str) -> PairDataModule:
    dm = PairDataModule(_write(tmp_path, records), tokenizer, batch_size=4, max_length=100_000,
                        max_prompt_length=50_000, share_prompt=share_prompt)
    dm.setup()
    assert len(dm.train_set) == N_RECORDS
    return dm


def _batches(dm: PairDataModule):
    return [dm.collate_one(dm.train_set[i:i + 4]) for i in range(0, len(dm.train_set), 4)]


@pytest.mark.slow
def test_dpo_logps_equal_trls(tmp_path, records, tokenizer):
    """The same prompt and reply tokens as DPOTrainer's prepared dataset (the reply through
    `<|im_end|>` and the newline after it), and the same summed reply log-probs at identical
    weights, with the prompt forwarded per sequence and once per pair."""
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import DPOConfig, DPOTrainer

    _quiet_trl()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(tokenizer)).eval()
    trainer = DPOTrainer(copy.deepcopy(model), ref_model=copy.deepcopy(model), args=_trl_args(DPOConfig, tmp_path),
                         train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    theirs = list(trainer.train_dataset)
    trl_batches = [trainer.data_collator(theirs[i:i + 4]) for i in range(0, N_RECORDS, 4)]
    with torch.no_grad():
        trl_logps = torch.cat([torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, b)) for b in trl_batches],
                              dim=1).double()
        exact = torch.cat([_exact_logps(model, b) for b in trl_batches], dim=1)
    for share_prompt in ("false", "true"):
        dm = _pair_module(tmp_path, records, tokenizer, share_prompt)
        assert dm.shares_prompt == (share_prompt == "true")
        for ours, trl_row in zip(dm.train_set, theirs):
            for side in ("chosen", "rejected"):
                example = getattr(ours, side)
                start = len(trl_row["prompt_ids"])
                assert example.input_ids == trl_row["prompt_ids"] + trl_row[f"{side}_ids"]
                assert example.labels == [IGNORE_INDEX] * start + trl_row[f"{side}_ids"]
        with torch.no_grad():
            ours_scores = [sequence_scores(model, b) for b in _batches(dm)]
        ours_logps = torch.cat([logps.view(2, -1) for logps, _, _ in ours_scores], dim=1).double()
        n_tokens = torch.cat([n.view(2, -1) for _, n, _ in ours_scores], dim=1)
        assert n_tokens.tolist() == [[len(r[f"{side}_ids"]) for r in theirs] for side in ("chosen", "rejected")]
        # Sums of up to ~2000 float32 log-probs (-1600 to -8300): ours are within a relative 1e-6 of an
        # exact (float64) scoring of TRL's batches (2e-6 when prompts are shared), TRL's own (its chunked
        # LM head) within 1e-5; one token more or less would move a sum by ~10.
        torch.testing.assert_close(ours_logps, exact, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(trl_logps, exact, rtol=1e-5, atol=1e-5)


def _exact_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs of a TRL DPO batch, in float64 throughout: (2, pairs)."""
    model64 = copy.deepcopy(model).double()
    logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, IGNORE_INDEX)
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token_logps * (labels != IGNORE_INDEX)).sum(-1).view(2, -1)


# --- RM: the sequences scored and the loss ----------------------------------------------------------

@pytest.mark.slow
def test_rm_sequences_and_loss_equal_trls(tmp_path, records, tokenizer):
    """The same chosen / rejected sequences as RewardTrainer's prepared dataset (the whole chat
    template rendering, through the newline after `<|im_end|>`, where the score is read), and the same
    rewards and loss at identical weights, with the prompt forwarded per sequence and once per pair."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import Qwen2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from llm_stages.losses.reward import pairwise_reward_loss
    from llm_stages.stages.reward import RewardPairwise

    _quiet_trl()
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(_config(tokenizer, num_labels=1)).eval()
    trainer = RewardTrainer(copy.deepcopy(model), args=_trl_args(RewardConfig, tmp_path),
                            train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    theirs = list(trainer.train_dataset)
    with torch.no_grad():
        trl_rewards, trl_losses = [], []
        for i in range(0, N_RECORDS, 4):
            batch = trainer.data_collator(theirs[i:i + 4])
            loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            trl_rewards.append(outputs.logits.squeeze(-1).view(2, -1))  # chosen rows, then rejected rows
            trl_losses.append(loss)
    for share_prompt in ("false", "true"):
        dm = _pair_module(tmp_path, records, tokenizer, share_prompt)
        for ours, trl_row in zip(dm.train_set, theirs):
            assert ours.chosen.input_ids == trl_row["chosen_ids"]
            assert ours.rejected.input_ids == trl_row["rejected_ids"]
        stage = SimpleNamespace(model=model)
        with torch.no_grad():
            rewards = [RewardPairwise.rewards(stage, b) for b in _batches(dm)]
        torch.testing.assert_close(torch.cat([torch.stack(r) for r in rewards], dim=1), torch.cat(trl_rewards, dim=1),
                                   rtol=0, atol=1e-5)
        losses = [pairwise_reward_loss(chosen, rejected).mean() for chosen, rejected in rewards]
        torch.testing.assert_close(torch.stack(losses), torch.stack(trl_losses), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_rm_pairs_over_max_length_are_dropped_as_trl_drops_them(tmp_path, records, tokenizer):
    """RewardTrainer filters out pairs longer than `max_length`; ours truncates them by default (the
    prompt from the left, then the replies), which moves the score off the end of the reply and so
    changes the loss on long-prompt data such as hh-rlhf. `datamodule.too_long=drop` keeps exactly
    TRL's pairs, with TRL's loss."""
    from datasets import Dataset
    from transformers import Qwen2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from llm_stages.losses.reward import pairwise_reward_loss

    _quiet_trl()
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(_config(tokenizer, num_labels=1)).eval()
    max_length = 1024
    trainer = RewardTrainer(copy.deepcopy(model), args=_trl_args(RewardConfig, tmp_path, max_length=max_length),
                            train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    theirs = list(trainer.train_dataset)
    assert 0 < len(theirs) < N_RECORDS  # the slice has pairs over max_length
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(theirs))

    settings = dict(batch_size=1, max_length=max_length, max_prompt_length=max_length // 2, share_prompt="false")
    dropped = PairDataModule(_write(tmp_path, records), tokenizer, too_long="drop", **settings)
    dropped.setup()
    assert [p.chosen.input_ids for p in dropped.train_set] == [r["chosen_ids"] for r in theirs]
    with torch.no_grad():
        batch = dropped.collate_one(dropped.train_set)
        rewards = reward_scores(model, batch.input_ids, batch.attention_mask)
    n = batch.num_pairs
    torch.testing.assert_close(pairwise_reward_loss(rewards[:n], rewards[n:]).mean(), trl_loss, rtol=0, atol=1e-5)

    truncated = PairDataModule(_write(tmp_path, records), tokenizer, **settings)
    truncated.setup()
    assert len(truncated.train_set) == N_RECORDS
    assert truncated.stats["train_truncated"] == N_RECORDS - len(theirs)
