"""The lm-evaluation-harness adapter, offline, on a local multiple-choice task: lm-eval's accuracy and
each option's log-likelihood equal the ones computed here by hand from the tiny model."""

from __future__ import annotations

import json
import socket

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install '.[eval]'")

from llm_stages.errors import ConfigError  # noqa: E402
from llm_stages.evaluate.lm_eval_adapter import run_lm_eval  # noqa: E402

from tests.conftest import TEST_MODEL  # noqa: E402

DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22", "3"], "answer": 0},
    {"question": "3 + 4 =", "choices": ["1", "7", "34", "12"], "answer": 1},
    {"question": "1 + 1 =", "choices": ["11", "3", "2", "0"], "answer": 2},
    {"question": "5 - 2 =", "choices": ["7", "52", "10", "3"], "answer": 3},
    {"question": "9 - 9 =", "choices": ["0", "18", "99", "1"], "answer": 0},
    {"question": "6 + 1 =", "choices": ["5", "7", "61", "8"], "answer": 1},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may be downloaded: the hub and datasets offline, and no connection at all."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("an offline test tried to connect")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local lm-eval task: a YAML file over a JSON-lines file, read with `dataset_path: json`."""
    root = tmp_path_factory.mktemp("lm_eval")
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / 'mc.jsonl'}}}
  cache_dir: {root / 'cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A fresh tiny model (seeded), also saved as an export: (model, tokenizer, directory)."""
    from llm_stages.config import compose
    from llm_stages.models import load_model, load_tokenizer

    cfg = compose(["model=tiny", *TEST_MODEL])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer).eval()
    out = tmp_path_factory.mktemp("lm_eval_model") / "export"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer, out


def option_loglikelihoods(model, tokenizer, doc) -> list[float]:
    """log p(" <choice>" | "Question: ...\\nAnswer:") for each choice, summed over the choice's tokens."""
    context = f"Question: {doc['question']}\nAnswer:"
    context_ids = tokenizer.encode(context)
    out = []
    for choice in doc["choices"]:
        ids = tokenizer.encode(context + " " + choice)
        assert ids[:len(context_ids)] == context_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        out.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return out


def test_accuracy_equals_the_one_by_hand(tiny, task_dir):
    model, tokenizer, _ = tiny
    lls = [option_loglikelihoods(model, tokenizer, d) for d in DOCS]
    acc = sum(max(range(4), key=lambda k: ll[k]) == d["answer"] for ll, d in zip(lls, DOCS)) / len(DOCS)
    acc_norm = sum(max(range(4), key=lambda k: ll[k] / len(d["choices"][k])) == d["answer"]
                   for ll, d in zip(lls, DOCS)) / len(DOCS)
    results = run_lm_eval(model, tokenizer, ["tiny_mc"], batch_size=4, include_path=str(task_dir),
                          include_defaults=False)
    assert set(results) == {"tiny_mc"}
    metrics = results["tiny_mc"]
    assert metrics["acc"] == pytest.approx(acc) and metrics["acc_norm"] == pytest.approx(acc_norm)
    assert metrics["sample_len"] == len(DOCS) and metrics["acc_stderr"] > 0
    assert run_lm_eval(model, tokenizer, ["tiny_mc"], limit=2, include_path=str(task_dir),
                       include_defaults=False)["tiny_mc"]["sample_len"] == 2


def test_eval_stage_task_type_lm_eval_runs_the_local_task(tiny, task_dir, tmp_path):
    from omegaconf import OmegaConf

    from llm_stages.errors import ConfigError
    from llm_stages.evaluate.run import TASK_TYPES
    from llm_stages.evaluate.task import EvalContext

    model, tokenizer, _ = tiny
    ctx = EvalContext(model, tokenizer, "causal_lm", torch.device("cpu"), 1234, 4, tmp_path, None, None, progress=False)
    task = OmegaConf.create({"type": "lm_eval", "tasks": ["tiny_mc"], "include_path": str(task_dir),
                             "include_defaults": False})
    result = TASK_TYPES["lm_eval"](ctx, "mc", task)
    expected = run_lm_eval(model, tokenizer, ["tiny_mc"], batch_size=4, include_path=str(task_dir), include_defaults=False)
    assert result.examples == len(DOCS) and result.metrics["tiny_mc/acc"] == expected["tiny_mc"]["acc"]
    with pytest.raises(ConfigError, match="eval.tasks.mc.tasks is empty"):
        TASK_TYPES["lm_eval"](ctx, "mc", OmegaConf.create({"type": "lm_eval"}))


def test_registered_model_loads_an_export_from_overrides(tiny, task_dir):
    """lm_eval.simple_evaluate(model="llm_stages", model_args={"overrides": ...}): our loading of
    the export, each option's log-likelihood as computed by hand."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer, export = tiny
    results = simple_evaluate(model="llm_stages", model_args={"overrides": f"model=local model.path={export}"},
                              tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    for sample in results["samples"]["tiny_mc"]:
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(option_loglikelihoods(model, tokenizer, sample["doc"]), abs=1e-4)


def test_bad_task_or_directory_is_one_clear_line(tiny, task_dir, tmp_path):
    model, tokenizer, _ = tiny
    with pytest.raises(ConfigError, match=r"\['nope'\] are not in .*lm_eval.*add the directory"):
        run_lm_eval(model, tokenizer, ["tiny_mc", "nope"], include_path=str(task_dir), include_defaults=False)
    with pytest.raises(ConfigError, match="include_path=.*missing: no such directory"):
        run_lm_eval(model, tokenizer, ["tiny_mc"], include_path=str(tmp_path / "missing"))
