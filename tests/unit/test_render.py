from llm_stages.data.kinds.conversation import sharegpt_messages
from llm_stages.data.kinds.text import pack_documents
from llm_stages.data.render import IGNORE_INDEX, num_trained_tokens, render_conversation
from llm_stages.data.sources import Record


def test_packing_blocks_are_contiguous_slices_with_eos_between_documents():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]]
    eos = 2
    stream = [10, 11, 12, eos, 20, 21, eos, 30, 31, 32, 33, eos, 40, eos]  # 14 tokens
    blocks = pack_documents(docs, eos, block_size=4, remainder="drop")
    assert [b.input_ids for b in blocks] == [stream[0:4], stream[4:8], stream[8:12]]
    assert all(b.labels == b.input_ids for b in blocks)
    padded = pack_documents(docs, eos, block_size=4, remainder="pad")
    assert [b.input_ids for b in padded] == [stream[0:4], stream[4:8], stream[8:12], stream[12:14]]


def test_packing_real_text_round_trips(tokenizer):
    texts = ["first document here", "second one", "and a third, longer document with more words in it"]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack_documents(ids, tokenizer.eos_token_id, block_size=8, remainder="pad")
    joined = [t for b in blocks for t in b.input_ids]
    expected = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
    assert joined == expected
    assert all(len(b.input_ids) == 8 for b in blocks[:-1])


def test_sft_labels_are_exactly_the_assistant_replies_plus_eos(tokenizer):
    record = Record("mem.jsonl", 1, {"conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What is 2 + 3?"},
        {"from": "gpt", "value": "2 + 3 = 5"},
        {"from": "human", "value": "And 7 - 4?"},
        {"from": "gpt", "value": "7 - 4 = 3"},
    ]})
    example = render_conversation(tokenizer, sharegpt_messages(record))
    full_text = tokenizer.apply_chat_template(sharegpt_messages(record), tokenize=False)
    assert tokenizer.decode(example.input_ids) == full_text

    # Group consecutive trained positions into spans and decode each.
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    eos = tokenizer.eos_token
    assert [tokenizer.decode(s) for s in spans] == [f"2 + 3 = 5{eos}\n", f"7 - 4 = 3{eos}\n"]
    assert num_trained_tokens(example.labels) == sum(len(s) for s in spans)


def test_turns_after_the_last_reply_are_not_rendered(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "unanswered"}]
    example = render_conversation(tokenizer, messages)
    assert "unanswered" not in tokenizer.decode(example.input_ids)


def test_tokenizer_without_template_gets_the_default_one(tokenizer):
    import copy

    from llm_stages.data.render import DEFAULT_CHAT_TEMPLATE, ensure_chat_template

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert ensure_chat_template(bare) and bare.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"}]
    example = render_conversation(bare, messages)
    assert bare.decode(example.input_ids) == "S\n\nHuman: hi\nAssistant: yo<|im_end|>\nHuman: again\nAssistant: ok<|im_end|>\n"
    trained = bare.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert trained == "yo<|im_end|>\nok<|im_end|>\n"
    assert not ensure_chat_template(tokenizer)  # an existing template is kept


def test_packed_rows_give_each_conversation_exactly_its_unpacked_logits_and_loss(tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llm_stages.data.collate import collate_causal
    from llm_stages.data.kinds.conversation import collate_packed, pack_examples
    from llm_stages.losses import token_cross_entropy

    conversations = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]
                     for i in (3, 14, 27, 5)]
    examples = [render_conversation(tokenizer, c) for c in conversations]
    rows = pack_examples(examples, max_length=2 * max(len(e.input_ids) for e in examples))
    assert len(rows) == 2 and [n for r in rows for n in r.doc_lengths] == [len(e.input_ids) for e in examples]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).eval()
    packed = collate_packed(rows, tokenizer.pad_token_id)
    plain = collate_causal(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        packed_logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                              position_ids=packed.position_ids).logits
        plain_logits = model(input_ids=plain.input_ids, attention_mask=plain.attention_mask).logits
    k = 0
    for r, row in enumerate(rows):
        start = 0
        for n in row.doc_lengths:
            torch.testing.assert_close(packed_logits[r, start:start + n], plain_logits[k, :n], atol=1e-5, rtol=1e-5)
            start, k = start + n, k + 1
    packed_sum, packed_n = token_cross_entropy(packed_logits, packed.labels)
    plain_sum, plain_n = token_cross_entropy(plain_logits, plain.labels)
    assert packed_n == plain_n  # no trained token predicts across a boundary
    torch.testing.assert_close(packed_sum, plain_sum, atol=1e-4, rtol=1e-5)
    assert packed.num_tokens == plain.num_tokens == sum(len(e.input_ids) for e in examples)
