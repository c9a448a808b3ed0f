from llm_stages.data.formats import Record, sharegpt_messages
from llm_stages.data.render import IGNORE_INDEX, num_trained_tokens, pack_documents, render_conversation


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
    assert [tokenizer.decode(s) for s in spans] == [f"2 + 3 = 5{eos}", f"7 - 4 = 3{eos}"]
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
    assert trained == "yo<|im_end|>ok<|im_end|>"
    assert not ensure_chat_template(tokenizer)  # an existing template is kept
