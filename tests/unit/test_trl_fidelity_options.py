"""The TRL-faithful defaults without real data: prompt/completion SFT trains the completion only
(`datamodule.completion_only_loss`), replies are trained through the newline after `<|im_end|>`,
and pairs over `max_length` are truncated or dropped (`datamodule.too_long`)."""

import json

import pytest
from omegaconf import OmegaConf

from llm_stages.data.datamodule import PairDataModule, SFTDataModule
from llm_stages.data.render import IGNORE_INDEX
from llm_stages.errors import ConfigError

PROMPT = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "and 3 + 3?"}]


def _data(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.0, "format": "auto",
                             "system_prompt": None, "demo": None})


def _trained(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize("completion_only_loss,trained", [(True, "6<|im_end|>\n"),
                                                          (False, "4<|im_end|>\n6<|im_end|>\n")])
def test_prompt_completion_trains_the_completion_only_unless_asked(tmp_path, tokenizer, completion_only_loss, trained):
    rows = [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": "6"}]}]
    dm = SFTDataModule(_data(tmp_path, rows), tokenizer, batch_size=1, completion_only_loss=completion_only_loss)
    dm.setup()
    assert _trained(tokenizer, dm.train_set[0]) == trained


def test_messages_keep_training_every_assistant_turn(tmp_path, tokenizer):
    rows = [{"messages": PROMPT + [{"role": "assistant", "content": "6"}]}]
    dm = SFTDataModule(_data(tmp_path, rows), tokenizer, batch_size=1)
    dm.setup()
    assert _trained(tokenizer, dm.train_set[0]) == "4<|im_end|>\n6<|im_end|>\n"


def test_pairs_over_max_length_truncate_or_drop(tmp_path, tokenizer):
    rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"},
            {"prompt": "a long prompt " * 20, "chosen": "a", "rejected": "b"}]
    settings = dict(batch_size=1, max_length=40, max_prompt_length=20, share_prompt="false")
    kept = PairDataModule(_data(tmp_path, rows), tokenizer, **settings)
    kept.setup()
    assert len(kept.train_set) == 2 and kept.stats["train_truncated"] == 1
    dropped = PairDataModule(_data(tmp_path, rows), tokenizer, too_long="drop", **settings)
    dropped.setup()
    assert len(dropped.train_set) == 1 and dropped.stats["train_dropped_too_long"] == 1
    with pytest.raises(ConfigError, match=r"datamodule.too_long=cut: expected one of truncate, drop"):
        PairDataModule(_data(tmp_path, rows), tokenizer, too_long="cut", **settings)


@pytest.mark.slow
def test_hh_rlhf_transcripts_are_chat_rendered_where_trl_scores_the_raw_text(tmp_path, tokenizer):
    """Raw hh-rlhf records (`{"chosen": transcript, "rejected": transcript}`) are not conversational
    to TRL: RewardTrainer scores the transcript text + EOS. Ours reads the turns and renders them
    with the chat template, as it renders every other format, so the two score different sequences
    (and their losses differ) unless TRL is given the conversational form of the same pairs."""
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    record = {"chosen": "\n\nHuman: 2 + 2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2 + 2?\n\nAssistant: 5"}
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, dataset_num_proc=None)
    trainer = RewardTrainer(Qwen2ForSequenceClassification(config), args=args, train_dataset=Dataset.from_list([record]),
                            processing_class=tokenizer)
    assert tokenizer.decode(trainer.train_dataset[0]["chosen_ids"]) == record["chosen"] + tokenizer.eos_token
    dm = PairDataModule(_data(tmp_path, [record]), tokenizer, batch_size=1, share_prompt="false")
    dm.setup()
    assert tokenizer.decode(dm.train_set[0].chosen.input_ids) == (
        "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
