"""Vocabulary expansion: `model.add_tokens` / `model.add_tokens_file` add normal tokens before the data is
tokenized, grow the embeddings with mean-initialised rows, and survive training and export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from llm_stages.errors import ConfigError
from llm_stages.models import expand_vocabulary
from llm_stages.train import build, train

NEW = ["<calc>", "</calc>", "zzqqx"]
ADD = 'model.add_tokens=["<calc>","</calc>","zzqqx"]'


def test_added_tokens_survive_training_and_export(make_cfg, tokenizer, tmp_path):
    original = len(tokenizer)
    metrics = train(make_cfg("stage=sft", ADD, "trainer.max_steps=2", output_dir=tmp_path / "sft"))
    assert metrics["steps"] == 2
    export = metrics["export_dir"]

    reloaded_tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    ids = {}
    for token in NEW:
        encoded = reloaded_tok(token, add_special_tokens=False)["input_ids"]
        assert len(encoded) == 1, (token, encoded)
        ids[token] = encoded[0]
        assert encoded[0] >= original
    assert len(set(ids.values())) == 3
    assert len(reloaded_tok) == original + 3
    assert model.get_input_embeddings().num_embeddings >= len(reloaded_tok)
    # In running text too: "12 + 30 = <calc>42</calc>" keeps each new token whole.
    text_ids = reloaded_tok("12 + 30 = <calc>42</calc> zzqqx", add_special_tokens=False)["input_ids"]
    assert {ids["<calc>"], ids["</calc>"], ids["zzqqx"]} <= set(text_ids)
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits
    assert logits.shape[-1] >= len(reloaded_tok) and torch.isfinite(logits).all()

    # Chaining from the export with the same setting adds nothing and keeps the ids.
    module, _ = build(make_cfg("stage=sft", "model=local", f"model.path={export}", ADD, output_dir=tmp_path / "chain"))
    assert len(module.tokenizer) == original + 3
    assert module.tokenizer.convert_tokens_to_ids(NEW) == [ids[t] for t in NEW]
    assert module.model.get_input_embeddings().num_embeddings == model.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_start_as_the_mean_of_the_old_rows(make_cfg, tokenizer, tied):
    original = len(tokenizer)
    module, datamodule = build(make_cfg("stage=sft", ADD, f"model.init.tie_word_embeddings={str(tied).lower()}"))
    model = module.model
    assert datamodule.tokenizer is module.tokenizer and len(module.tokenizer) == original + 3
    new_ids = module.tokenizer.convert_tokens_to_ids(NEW)
    assert sorted(new_ids) == list(range(original, original + 3))
    inp = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings().weight.detach()
    assert inp.shape[0] == out.shape[0] == original + 3
    assert (out.data_ptr() == inp.data_ptr()) == tied
    matrices = [inp] if tied else [inp, out]
    for weight in matrices:
        mean = weight[:original].mean(dim=0)
        for i in new_ids:
            torch.testing.assert_close(weight[i], mean)
        assert not torch.allclose(weight[0], mean)  # the old rows are untouched, not overwritten
    if not tied:
        assert not torch.allclose(inp[original], out[original])  # each matrix got its own mean
    assert model.config.vocab_size == original + 3


def test_expand_vocabulary_skips_tokens_already_present(make_cfg, tokenizer):
    module, _ = build(make_cfg("stage=sft"))
    tok = module.tokenizer
    rows = module.model.get_input_embeddings().num_embeddings
    assert "a" in tok.get_vocab()
    assert expand_vocabulary(module.model, tok, ["a", "<calc>", "<calc>"]) == 1
    assert expand_vocabulary(module.model, tok, ["a", "<calc>"]) == 0
    assert len(tok) == len(tokenizer) + 1 and module.model.get_input_embeddings().num_embeddings == rows + 1


def test_add_tokens_file(make_cfg, tokenizer, tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# tool-call markers\n<tool>\n\n</tool>\nzzqqx\n", encoding="utf-8")
    module, _ = build(make_cfg("stage=sft", f"model.add_tokens_file={path}", 'model.add_tokens=["zzqqx"]'))
    added = set(module.tokenizer.get_added_vocab()) - set(tokenizer.get_added_vocab())
    assert added == {"<tool>", "</tool>", "zzqqx"}
    assert len(module.tokenizer) == len(tokenizer) + 3
    assert module.model.get_input_embeddings().num_embeddings == len(tokenizer) + 3

    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match="model.add_tokens_file") as err:
        build(make_cfg("stage=sft", f"model.add_tokens_file={missing}"))
    assert str(missing) in str(err.value)


def test_add_tokens_with_the_reward_model_head(make_cfg, tokenizer, tmp_path):
    original = len(tokenizer)
    metrics = train(make_cfg("stage=rm", ADD, "trainer.max_steps=2", output_dir=tmp_path / "rm"))
    assert metrics["steps"] == 2
    model = AutoModelForSequenceClassification.from_pretrained(metrics["export_dir"])
    reloaded_tok = AutoTokenizer.from_pretrained(metrics["export_dir"])
    assert len(reloaded_tok) == original + 3
    assert model.get_input_embeddings().num_embeddings >= original + 3
    ids = reloaded_tok("<calc>1+1</calc> zzqqx", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        scores = model(torch.tensor([ids])).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()
