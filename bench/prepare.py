"""What both sides of a comparison read: one model checkpoint, one set of data records, tokenized once.

- The model (`model=tiny`: a fresh seeded one; `model=smollm2`: dequantised from the GGUF) is saved
  once as a plain HF checkpoint with its tokenizer; our side loads it with `model=local model.path=`,
  TRL from the same directory. Reward models get a second checkpoint with the scalar head already
  initialised, so both sides start from the same head too.
- Records are a prefix of the demo data, as long as the run needs. They are tokenized once, by our
  data module (which fills our tokenization cache, so our child starts without tokenizing); TRL gets
  those very token ids (its `_prepare_dataset` skips tokenizing pre-tokenized columns), so both
  sides train on identical sequences and tokenization is outside both measurements.
- For unpacked SFT, RM, DPO and GRPO, TRL's rows are written in the order our sampler draws them and
  TRL reads them in order, so step i of both sides is the same batch (same padding, same tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.workloads import Workload, our_overrides

CONVERSATION_TOKENS_LOW = 20  # fewer tokens than any demo conversation has: sizes the packed-SFT data generously


def save_checkpoints(model: str, out: Path, seed: int) -> dict[str, str]:
    """`model` (a config in conf/model) saved as HF checkpoints: {"causal": dir, "reward": dir}."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from llm_stages.config import compose
    from llm_stages.data.render import ensure_chat_template
    from llm_stages.models import load_model, load_tokenizer

    transformers.logging.set_verbosity_error()  # the reward head is new by design: no load report for it
    transformers.logging.disable_progress_bar()
    cfg = compose([f"model={model}"], output_dir=str(out / "compose")).model
    torch.manual_seed(seed)  # a fresh tiny model's initial weights
    tokenizer = load_tokenizer(cfg)
    ensure_chat_template(tokenizer)  # what our data modules would do; saved, so TRL renders prompts the same way
    causal = load_model(cfg, tokenizer)
    paths = {"causal": str(out / "causal"), "reward": str(out / "reward")}
    causal.save_pretrained(paths["causal"])
    tokenizer.save_pretrained(paths["causal"])
    del causal
    torch.manual_seed(seed)  # the reward head's initial weights
    reward = AutoModelForSequenceClassification.from_pretrained(paths["causal"], num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(paths["reward"])
    tokenizer.save_pretrained(paths["reward"])
    return paths


def count_parameters(checkpoint: str) -> int:
    """Parameters of a saved checkpoint, read from its safetensors headers (nothing is loaded). A tied
    LM head is stored once, so it counts once, as in `model.parameters()`."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += torch.Size(f.get_slice(key).get_shape()).numel()
    if total == 0:
        raise SystemExit(f"{checkpoint}: no safetensors weights to count")
    return total


LONG_PROMPT_HISTORY = 6  # earlier exchanges before each long-prompt pair's question


def write_long_prompt_pairs(pref_train: Path, dest: Path, history: int = LONG_PROMPT_HISTORY) -> Path:
    """Pairs with long multi-turn prompts, as hh-rlhf's are, made from the demo pairs so the bench needs
    no other data: pair k's prompt is the question and chosen answer of pairs k+1..k+history (cycling)
    as earlier exchanges, then pair k's own question; its replies stay pair k's. Deterministic."""
    records = [json.loads(line) for line in pref_train.read_text(encoding="utf-8").splitlines()]
    with open(dest, "w", encoding="utf-8") as f:
        for k, record in enumerate(records):
            turns = []
            for j in range(1, history + 1):
                earlier = records[(k + j) % len(records)]
                turns += [*earlier["conversations"], {"from": "gpt", "value": earlier["chosen"]}]
            f.write(json.dumps({**record, "conversations": turns + record["conversations"]}) + "\n")
    return dest


# Data made from the demo files and filled to each workload's max_length: name -> the demo file it is made from.
FILLED_DATA = {"sft_filled": "sft_train", "pref_filled": "pref_train"}
TURN_TOKENS_LOW = 10  # fewer tokens than any demo exchange adds to a long conversation: sizes the demo data


def _messages(turns: list[dict]) -> list[dict]:
    """ShareGPT turns (the demo's `from`/`value`) as chat messages."""
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


def fill_conversations(records: list[dict], tokenizer, max_length: int, count: int) -> list[dict]:
    """`count` long multi-turn conversations, each the next demo conversations in order, concatenated
    while the whole, rendered as our data module renders it, stays within `max_length` tokens (so
    nothing is truncated); every assistant turn is trained, as SFT trains multi-turn data. A system
    message is kept only at the start of a long conversation. Deterministic."""
    from llm_stages.data.render import render_conversation

    out, cursor = [], 0
    while len(out) < count:
        turns: list[dict] = []
        while True:
            if cursor == len(records):
                raise SystemExit(f"the demo conversations ran out after {len(out)} long ones; use fewer --steps "
                                 f"or a smaller --batch-size")
            candidate = turns + [t for t in records[cursor]["conversations"] if not (turns and t["from"] == "system")]
            if len(render_conversation(tokenizer, _messages(candidate)).input_ids) > max_length:
                break
            turns, cursor = candidate, cursor + 1
        if not turns:
            raise SystemExit(f"a demo conversation is longer than {max_length} tokens: record {cursor + 1}")
        out.append({"conversations": turns})
    return out


def fill_prompt_pairs(records: list[dict], tokenizer, max_length: int, count: int) -> list[dict]:
    """`count` pairs with long multi-turn prompts: a demo pair's question and replies after as many
    earlier exchanges (the next demo pairs' questions and chosen answers, in order) as keep its longer
    sequence, rendered as our data module renders it, within `max_length` tokens. Deterministic."""
    from llm_stages.data.kinds.pair import length, render_pair

    def longest(history: list[dict], record: dict) -> int:
        prompt = _messages(history + record["conversations"])
        return length(render_pair(tokenizer, prompt, record["chosen"], record["rejected"]))

    out, cursor = [], 0
    while len(out) < count:
        record, history = records[cursor], []
        cursor += 1
        while True:
            if cursor >= len(records):
                raise SystemExit(f"the demo pairs ran out after {len(out)} long-prompt pairs; use fewer --steps or a "
                                 f"smaller --batch-size")
            earlier = records[cursor]
            candidate = history + earlier["conversations"] + [{"from": "gpt", "value": earlier["chosen"]}]
            if longest(candidate, record) > max_length:
                break
            history, cursor = candidate, cursor + 1
        out.append({**record, "conversations": history + record["conversations"]})
    return out


def write_filled(w: Workload, source: Path, dest: Path, tokenizer, count: int) -> Path:
    """`count` records of workload `w`'s filled data (see FILLED_DATA), written to `dest`."""
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    fill = fill_conversations if w.data == "sft_filled" else fill_prompt_pairs
    with open(dest, "w", encoding="utf-8") as f:
        for record in fill(records, tokenizer, w.max_length, count):
            f.write(json.dumps(record) + "\n")
    return dest


def demo_problems(workloads: list[Workload], total_steps: dict[str, int], n_val: int) -> int:
    """Demo training problems to write for these workloads: twice the records the largest one reads
    (SFT has ~0.77 conversations per problem), at least 500, and at most what the demo task has
    besides the `n_val` validation problems. The bound of filled data is conservative (TURN_TOKENS_LOW);
    where the demo records do run out, fill_conversations / fill_prompt_pairs say so in one line."""
    from llm_stages.data.demo import TRIPLES

    wanted = 2 * max(demo_records_needed(w, total_steps[w.name]) for w in workloads)
    return min(len(TRIPLES) - n_val, max(500, wanted))


def demo_records_needed(w: Workload, total_steps: int) -> int:
    """Demo records a run of `total_steps` steps reads: filled data concatenates many per record."""
    n = records_needed(w, total_steps)
    return n * (w.max_length // TURN_TOKENS_LOW) if w.data in FILLED_DATA else n


def records_needed(w: Workload, total_steps: int) -> int:
    """Records for `total_steps` steps and one more batch, so no side starts a second epoch."""
    per_step = w.batch_size
    if w.options.get("packing"):
        # Packed rows hold max_length tokens at most; size for rows packed full of the shortest conversations.
        per_step = w.batch_size * w.max_length // CONVERSATION_TOKENS_LOW
    return (total_steps + 1) * per_step


def _write_prefix(source: Path, dest: Path, n: int) -> None:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) < n:
        raise SystemExit(f"{source} has {len(lines)} records, the run needs {n}; use fewer --steps")
    dest.write_text("".join(lines[:n]), encoding="utf-8")


def _our_examples(w: Workload, overrides: list[str], out: Path):
    """Our data module's training examples for these overrides (unpacked: TRL packs its own way)."""
    from hydra.utils import instantiate

    from llm_stages.config import compose
    from llm_stages.models import load_tokenizer

    cfg = compose([*overrides, *(["datamodule.packing=false"] if w.stage == "sft" else [])], output_dir=str(out))
    tokenizer = load_tokenizer(cfg.model)
    datamodule = instantiate(cfg.datamodule, data=cfg.data, tokenizer=tokenizer, seed=cfg.seed, _recursive_=False)
    datamodule.setup("fit")
    return datamodule, tokenizer, cfg


def _our_order(n: int, batch_size: int, seed: int) -> list[int]:
    """Indices in the order our first epoch draws them (see ResumableBatchSampler), then the rest."""
    from llm_stages.data.collate import ResumableBatchSampler

    drawn = [i for batch in ResumableBatchSampler(n, batch_size, seed=seed).batches(0) for i in batch]
    return drawn + sorted(set(range(n)) - set(drawn))


def _first_label(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != -100)


def _sequences(example) -> list:
    """The token rows of one example: a conversation, or a pair's chosen and rejected sequences."""
    return [example.chosen, example.rejected] if hasattr(example, "chosen") else [example]


def _check_filled(w: Workload, stats: dict, examples: list, records: int) -> None:
    """Filled data is made to fit: every record kept, nothing cut, every sequence within max_length
    (TRL, on the same ids, then cuts nothing either, and both sides process the same tokens)."""
    cut = {k: v for k, v in stats.items() if v and any(w in k for w in ("truncated", "dropped", "skipped"))}
    longest = max(len(s.input_ids) for e in examples for s in _sequences(e))
    if cut or len(examples) != records or longest > w.max_length:
        raise SystemExit(f"{w.name}: the filled data should fit max_length {w.max_length} whole, but our data module "
                         f"kept {len(examples)} of {records} records (stats: {cut or 'none'}), longest sequence "
                         f"{longest} tokens")


def _length_note(examples: list) -> str:
    lengths = sorted(len(s.input_ids) for e in examples for s in _sequences(e))
    trained = sum(sum(label != -100 for label in s.labels) for e in examples for s in _sequences(e))
    return (f"filled sequences: {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
            f"{trained / sum(lengths):.0%} of the tokens trained; nothing truncated on either side")


def prepare_workload(w: Workload, *, demo: dict[str, Path], checkpoints: dict[str, str], workdir: Path,
                     total_steps: int, trainer: str, seed: int) -> dict:
    """Data for one workload: our data file and overrides, TRL's (or the naive baseline's) rows, and
    notes on anything that makes the sides' inputs differ."""
    checkpoint = checkpoints["reward" if w.stage == "rm" else "causal"]
    n = records_needed(w, total_steps)
    source = demo.get(w.data)
    if w.data in FILLED_DATA:
        from transformers import AutoTokenizer

        source = workdir / "data" / f"{w.name}.filled.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        write_filled(w, demo[FILLED_DATA[w.data]], source, AutoTokenizer.from_pretrained(checkpoints["causal"]), n)
    available = sum(1 for _ in open(source, encoding="utf-8"))
    if w.options.get("packing"):
        n = min(n, available)  # sized for the shortest conversations: the loop below checks the real token count
    data_path = workdir / "data" / f"{w.name}.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        _write_prefix(source, data_path, n)
        overrides = our_overrides(w, checkpoint=checkpoint, data_path=str(data_path), cache_dir=str(workdir / "cache"),
                                  log_dir=str(workdir / "runs"), total_steps=total_steps, trainer=trainer, seed=seed)
        datamodule, tokenizer, cfg = _our_examples(w, overrides, workdir / "compose")
        examples = datamodule.train_set
        if not w.options.get("packing"):
            break
        # Enough tokens that even rows packed without a gap (TRL's best-fit) fill every step of the run.
        tokens, needed = sum(len(e.input_ids) for e in examples), (total_steps + 1) * w.batch_size * w.max_length
        if tokens >= needed:
            break
        if n == available:
            raise SystemExit(f"{w.name}: the demo data holds {tokens:,} tokens of conversations, the run needs "
                             f"{needed:,}; use fewer --steps or a smaller --batch-size / --max-length")
        n = min(2 * n, available)
    notes = [f"our data module: {k}={v}" for k, v in datamodule.stats.items()]
    if w.data in FILLED_DATA:
        _check_filled(w, datamodule.stats, examples, n)
        notes.append(_length_note(examples))
    if w.stage in ("rm", "dpo"):
        from llm_stages.data.kinds.shared_pair import prompt_saving

        notes.append(f"our prompts {'forwarded once per pair' if datamodule.shares_prompt else 'forwarded per sequence'} "
                     f"(share_prompt={datamodule.share_prompt}; sharing saves {prompt_saving(examples):.0%} of the tokens)")
    order = list(range(len(examples))) if w.options.get("packing") else _our_order(len(examples), w.batch_size, cfg.seed)

    if w.stage == "sft":
        rows = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in (examples[i] for i in order)]
    elif w.stage == "rm":
        rows = [{"chosen_ids": list(p.chosen.input_ids), "rejected_ids": list(p.rejected.input_ids)}
                for p in (examples[i] for i in order)]
    elif w.stage == "dpo":
        rows = []
        for p in (examples[i] for i in order):
            # The shared prompt is everything before the first trained token; the replies keep the template
            # text after their EOS (e.g. ChatML's "\n"), which our side feeds too but does not score.
            start = _first_label(p.chosen.labels)
            if start != _first_label(p.rejected.labels) or p.chosen.input_ids[:start] != p.rejected.input_ids[:start]:
                raise SystemExit(f"{w.name}: a pair's chosen and rejected prompts differ; cannot split it for TRL")
            rows.append({"prompt_ids": list(p.chosen.input_ids[:start]), "chosen_ids": list(p.chosen.input_ids[start:]),
                         "rejected_ids": list(p.rejected.input_ids[start:])})
    else:  # RL prompts: TRL renders the messages with the same chat template; checked to give our token ids
        from llm_stages.data.kinds.prompt import prompt_record
        from llm_stages.data.sources import read_records

        prompts = [prompt_record(r) for r in read_records(data_path)]
        if len(prompts) != len(examples):
            raise SystemExit(f"{w.name}: our data module dropped prompts; the sides would see different ones")
        rows, mismatched = [], 0
        for i in order:
            rendered = tokenizer.apply_chat_template(prompts[i].messages, add_generation_prompt=True, tokenize=False)
            mismatched += tokenizer(rendered, add_special_tokens=False)["input_ids"] != list(examples[i].input_ids)
            rows.append({"prompt": prompts[i].messages, "answer": prompts[i].answer,
                         "prompt_ids": list(examples[i].input_ids), "question": examples[i].prompt})
        if mismatched:
            notes.append(f"{mismatched}/{len(rows)} prompts tokenize differently through TRL's chat template path")
    rows_path = workdir / "data" / f"{w.name}.baseline.jsonl"
    with open(rows_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"overrides": overrides, "checkpoint": checkpoint, "baseline_rows": str(rows_path), "records": n,
            "examples": len(examples), "notes": notes}
