"""Each record kind's module reads, renders, collates and describes it; stages reach the pairs only
through the DataModule's public methods."""

import json

from omegaconf import OmegaConf

from llm_stages.data.kinds import conversation, pair, prompt, text, unpaired


def test_every_kind_module_reads_renders_collates_and_describes():
    for kind in (conversation, pair, prompt):
        assert all(callable(getattr(kind, name)) for name in ("detect_format", "render", "describe"))
    assert callable(conversation.read_conversation) and callable(conversation.collate_packed)
    assert callable(pair.read_pair) and callable(pair.collate_pairs)
    assert callable(prompt.read_prompt) and callable(prompt.collate_prompts)
    assert callable(text.read_document) and callable(text.render_blocks) and callable(text.describe)
    assert callable(unpaired.read_unpaired) and callable(unpaired.detect_format)  # a reader only, for now


def test_reference_batches_cover_each_split_in_index_order_and_fingerprint_follows_the_tokens(tmp_path, tokenizer):
    from llm_stages.data.datamodule import PairDataModule

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": "no"}) + "\n"
                            for i in range(7)))
    data = OmegaConf.create({"path": str(path), "val_path": None, "val_ratio": 0.3, "format": "auto",
                             "system_prompt": None, "demo": None})
    dm = PairDataModule(data, tokenizer, batch_size=1, val_batch_size=2)
    dm.setup()
    for split, pairs in (("train", dm.train_set), ("val", dm.val_set)):
        batches = list(dm.reference_batches(split))
        assert [i for b in batches for i in b.index.tolist()] == list(range(len(pairs)))
        assert all(b.num_pairs <= 2 for b in batches)
    fingerprint = dm.fingerprint()
    assert len(fingerprint) == 16 and fingerprint == pair.fingerprint({"train": dm.train_set, "val": dm.val_set})
    dm.val_set = dm.val_set[:-1]
    assert dm.fingerprint() != fingerprint
