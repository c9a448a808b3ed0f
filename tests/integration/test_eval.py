"""stage=eval and the generate command on the tiny model, where the right answer is known: a model
that memorised a prompt -> answer set scores 1.0 on it and a fresh one 0; a reward model's accuracy
on hand-built pairs is the hand count; multiple-choice log-likelihoods are the hand-computed ones;
`generate` writes the eval task's completions; results.json, the W&B table, the bad-input lines,
and a pipeline's eval step (one table, a row per export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from llm_stages.data.collate import collate_causal
from llm_stages.data.render import render_conversation
from llm_stages.errors import ConfigError, DataFormatError
from llm_stages.evaluate.run import evaluate, evaluate_exports, generate
from llm_stages.training.export import export_hf
from llm_stages.models import load_model, load_tokenizer
from llm_stages.losses.causal import token_cross_entropy

FACTS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(12, 7), (30, 41), (5, 5), (66, 13), (8, 80), (21, 2),
                                                         (47, 47), (90, 9)]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fresh tiny model, the same model trained by plain torch steps to memorise FACTS (300 steps), and a fresh
    reward model, each exported; the prompt file with ids and answers."""
    root = tmp_path_factory.mktemp("eval")
    model_cfg = OmegaConf.create({"name": "tiny", "init": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                          "num_attention_heads": 2, "num_key_value_heads": 1,
                                                          "max_position_embeddings": 256, "tie_word_embeddings": True}})
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = load_model(model_cfg, tokenizer)
    export_hf(model, tokenizer, root / "fresh")
    batch = collate_causal([render_conversation(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                            for q, a in FACTS], tokenizer.pad_token_id)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss_sum, n = token_cross_entropy(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                          batch.labels)
        optimiser.zero_grad()
        (loss_sum / n).backward()
        optimiser.step()
    assert (loss_sum / n).item() < 0.05
    export_hf(model, tokenizer, root / "memorised")
    export_hf(load_model(model_cfg, tokenizer, head="reward"), tokenizer, root / "rm")
    prompts = write_jsonl(root / "facts.jsonl", [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(FACTS)])
    return {"root": root, "tokenizer": tokenizer, "prompts": prompts}


def eval_cfg(make_cfg, out: Path, model_path: Path, tasks: dict, *overrides: str):
    cfg = make_cfg("stage=eval", f"model.path={model_path}", "eval.progress_bar=false", *overrides, output_dir=out)
    with open_dict(cfg):
        cfg.eval.tasks = tasks
    return cfg


def generation_task(path, **settings) -> dict:
    return {"type": "generation", "data": {"path": str(path)}, "generation": {"max_new_tokens": 8, "do_sample": False},
            **settings}


def test_memorised_answers_score_one_and_a_fresh_model_zero(setup, make_cfg, tmp_path):
    tasks = {"facts": generation_task(setup["prompts"])}
    memorised = evaluate(eval_cfg(make_cfg, tmp_path / "m", setup["root"] / "memorised", tasks, "logger=wandb"))
    fresh = evaluate(eval_cfg(make_cfg, tmp_path / "f", setup["root"] / "fresh", tasks))
    assert memorised["tasks"]["facts"]["metrics"]["accuracy"] == 1.0
    assert fresh["tasks"]["facts"]["metrics"]["accuracy"] == 0.0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert set(results) == {"suite", "model", "head", "seed", "tasks"} and results["head"] == "causal_lm"
    facts = results["tasks"]["facts"]
    assert set(facts) == {"type", "examples", "metrics", "completions"} and facts["examples"] == len(FACTS)
    assert set(facts["metrics"]) == {"accuracy", "pass@1", "mean_reply_tokens"}
    rows = [json.loads(line) for line in Path(facts["completions"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(FACTS))] and all(r["correct"] == 1.0 for r in rows)
    assert [r["completion"] for r in rows] == [a for _, a in FACTS]
    assert facts["metrics"]["mean_reply_tokens"] == pytest.approx(
        sum(len(setup["tokenizer"](a)["input_ids"]) + 1 for _, a in FACTS) / len(FACTS))  # reply + <|im_end|>
    # The offline W&B run holds the table.
    assert list((tmp_path / "m" / "wandb").glob("offline-run-*/files/media/table/eval/results_*.table.json"))


def test_pass_at_k_from_sampled_replies_and_generate_writes_the_same_completions(setup, make_cfg, tmp_path):
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 1.0}
    tasks = {"facts": {**generation_task(setup["prompts"], num_samples=4, pass_k=[1, 2, 4]), "generation": sampled}}
    result = evaluate(eval_cfg(make_cfg, tmp_path / "e", setup["root"] / "memorised", tasks, "eval.batch_size=3"))
    rows = [json.loads(line) for line in (tmp_path / "e" / "facts_completions.jsonl").read_text().splitlines()]
    correct = torch.tensor([r["correct"] for r in rows]).view(len(FACTS), 4).sum(1)
    from math import comb
    metrics = result["tasks"]["facts"]["metrics"]
    for k in (1, 2, 4):
        assert metrics[f"pass@{k}"] == pytest.approx(sum(1 - comb(4 - int(c), k) / comb(4, k) for c in correct) / len(FACTS))
    assert metrics["accuracy"] == pytest.approx(correct.sum().item() / (4 * len(FACTS)))

    # `python -m llm_stages generate ...` is stage=generate (llm_stages.__main__.command_argv, tested in unit/)
    out = generate(make_cfg("stage=generate", f"model.path={setup['root'] / 'memorised'}", f"data.path={setup['prompts']}",
                            "generate.batch_size=3", "generate.num_samples=4",
                            *[f"generate.generation.{k}={v}" for k, v in sampled.items()], output_dir=tmp_path / "g"))
    assert out == tmp_path / "g" / "completions.jsonl"
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    keep = ("prompt", "completion", "sample", "id")
    assert generated == [{k: r[k] for k in keep} for r in rows]


def test_reward_model_accuracy_is_the_hand_count_with_subsets(setup, make_cfg, tmp_path):
    tokenizer = setup["tokenizer"]
    pairs = [{"prompt": q, "chosen": a, "rejected": str(int(a) + d), "category": "near" if d < 5 else "far"}
             for (q, a), d in zip(FACTS, [1, 2, 3, 10, 20, 1, 30, 2])]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    result = evaluate(eval_cfg(make_cfg, tmp_path / "rm", setup["root"] / "rm",
                               {"pairs": {"type": "preference", "data": {"path": str(path)}},
                                "facts": generation_task(setup["prompts"])}))
    rm = load_model(OmegaConf.create({"name": "rm", "path": str(setup["root"] / "rm")}), tokenizer, head="reward").eval()

    def score(prompt: str, reply: str) -> float:  # the RM's own reading of the chat template's text
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            return rm(input_ids=torch.tensor([ids])).logits.item()

    wins = [score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"]) for p in pairs]
    metrics = result["tasks"]["pairs"]["metrics"]
    assert metrics["accuracy"] == pytest.approx(sum(wins) / len(pairs)) and result["head"] == "reward"
    for category in ("near", "far"):
        hand = [w for w, p in zip(wins, pairs) if p["category"] == category]
        assert metrics[f"{category}/accuracy"] == pytest.approx(sum(hand) / len(hand))
    assert {"calibration_ece", "length_bias/reward_length_corr"} <= set(metrics)
    assert result["tasks"]["facts"]["skipped"] == "a reward model does not generate"


def test_multiple_choice_log_likelihoods_match_a_hand_computation(setup, make_cfg, tmp_path):
    from llm_stages.data.kinds.choice import read_choice, render_choice
    from llm_stages.data.kinds.prompt import render_prompt
    from llm_stages.data.sources import Record

    questions = [{"question": q, "choices": [a, str(int(a) + 1), "seven"], "answer": i % 3} for i, (q, a) in enumerate(FACTS)]
    path = write_jsonl(tmp_path / "mc.jsonl", questions)
    tasks = {"mc": {"type": "likelihood", "kind": "multiple_choice", "score": "acc_norm", "data": {"path": str(path)}},
             "ppl": {"type": "likelihood", "data": {"path": str(write_jsonl(tmp_path / "sft.jsonl", [
                 {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]))}}}
    result = evaluate(eval_cfg(make_cfg, tmp_path / "mc", setup["root"] / "memorised", tasks))
    tokenizer = setup["tokenizer"]
    model = load_model(OmegaConf.create({"name": "m", "path": str(setup["root"] / "memorised")}), tokenizer).eval()
    acc, acc_norm = [], []
    for record in questions:
        context = render_prompt(tokenizer, [{"role": "user", "content": record["question"]}], None).input_ids
        logps = []
        for option in record["choices"]:
            ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + ids])).logits[0]
            log_softmax = torch.log_softmax(logits.double(), -1)
            logps.append(sum(log_softmax[len(context) - 1 + j, t].item() for j, t in enumerate(ids)))
        chars = [len(o) for o in record["choices"]]
        acc.append(max(range(3), key=lambda i: logps[i]) == record["answer"])
        acc_norm.append(max(range(3), key=lambda i: logps[i] / chars[i]) == record["answer"])
        # the rendered rows are exactly these sequences
        rows = render_choice(tokenizer, read_choice(Record(str(path), 1, record)))
        assert [r.input_ids for r in rows] == [context + tokenizer(o, add_special_tokens=False)["input_ids"]
                                               for o in record["choices"]]
    metrics = result["tasks"]["mc"]["metrics"]
    assert metrics["acc"] == pytest.approx(sum(acc) / len(acc)) and metrics["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm))
    assert metrics["accuracy"] == metrics["acc_norm"] and 0 < metrics["acc"] < 1  # the answers are not all first
    ppl = result["tasks"]["ppl"]["metrics"]  # replies only: the memorised replies are near-certain
    # each reply's tokens, its <|im_end|> and the newline after it
    assert ppl["loss"] < 0.1 and ppl["tokens"] == sum(len(tokenizer(a)["input_ids"]) + 2 for _, a in FACTS)


def test_bad_input_is_one_line(setup, make_cfg, tmp_path):
    memorised = setup["root"] / "memorised"
    no_answers = write_jsonl(tmp_path / "no_answers.jsonl", [{"question": q} for q, _ in FACTS])
    with pytest.raises(DataFormatError, match=r"no_answers.jsonl:1: field 'answer': eval task 'facts' scores answers"):
        evaluate(eval_cfg(make_cfg, tmp_path / "a", memorised, {"facts": generation_task(no_answers)}))
    with pytest.raises(ConfigError, match=r"eval.tasks.x.type=bleu: unknown task type; known: episodes, generation, likelihood, lm_eval, preference"):
        evaluate(eval_cfg(make_cfg, tmp_path / "b", memorised, {"x": {"type": "bleu", "data": {"path": "p"}}}))
    with pytest.raises(DataFormatError, match="facts.jsonl:1: .*preference") as error:  # prompts are not pairs
        evaluate(eval_cfg(make_cfg, tmp_path / "c", memorised, {"p": {"type": "preference", "data": {"path": str(setup["prompts"])}}}))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"^eval.reward_model.path=\S*nope"):
        evaluate(eval_cfg(make_cfg, tmp_path / "d", memorised, {"facts": generation_task(setup["prompts"])},
                          f"eval.reward_model.path={tmp_path / 'nope'}"))


def test_pipeline_eval_step_makes_one_table_with_a_row_per_export(setup, demo_dir, tmp_path, capsys):
    """The demo pipeline's last step (experiment=demo_eval) on exports made here: pt = the fresh model,
    sft = the memorised one (also the reference), rm = the fresh reward model (also scoring replies)."""
    import shutil

    from llm_stages.config import compose
    from llm_stages.pipeline import run_pipeline

    for stage, source in (("pt", "fresh"), ("sft", "memorised"), ("rm", "rm")):
        shutil.copytree(setup["root"] / source, tmp_path / "demo" / stage / "export")
    cli = [f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={tmp_path}", "logger=wandb"]
    cfg = compose(["pipeline=demo", *cli], output_dir=str(tmp_path / "demo"))
    assert cfg.pipeline.stages[-1].name == "eval"  # the demo ends with the eval step
    with open_dict(cfg):
        step = cfg.pipeline.stages[-1]
        few = []  # the first 16 records of each demo test file, to keep the test short
        for task, file in (("arithmetic", "rl_test"), ("pairs", "pref_test"), ("replies", "sft_test")):
            lines = (demo_dir / f"{file}.jsonl").read_text().splitlines(keepends=True)[:16]
            (tmp_path / f"{file}.jsonl").write_text("".join(lines))
            few.append(f"eval.tasks.{task}.data.path={tmp_path / file}.jsonl")
        cfg.pipeline.stages = [{**step, "evaluate": ["pt", "sft", "rm"],
                                "overrides": [*step.overrides, *few, "eval.tasks.arithmetic.generation.max_new_tokens=8"]}]
    [row] = run_pipeline(cfg, cli)
    assert row["stage"] == "eval" and row["status"] == "ran" and row["export"] == str(tmp_path / "demo" / "eval")
    table = (tmp_path / "demo" / "eval" / "table.md").read_text().splitlines()
    assert table[0].split(" | ")[:3] == ["| export", "arithmetic/accuracy", "arithmetic/reward_model_score"]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| pt", "| sft", "| rm"]
    assert "\n".join(table) in capsys.readouterr().out  # printed last
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert results["sft"]["tasks"]["pairs"]["metrics"]["accuracy"] == 0.5  # the reference itself: every pair a tie
    assert results["sft"]["tasks"]["pairs"]["scored_by"] == "implicit_reward"
    assert results["rm"]["tasks"]["pairs"]["scored_by"] == "reward_model" and "skipped" in results["rm"]["tasks"]["arithmetic"]
    assert "reward_model_score" in results["pt"]["tasks"]["arithmetic"]["metrics"]
    assert list((tmp_path / "demo" / "eval").glob("wandb/offline-run-*/files/media/table/pipeline/eval_*.table.json"))
