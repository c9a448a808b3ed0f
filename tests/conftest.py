"""Shared fixtures: everything offline, on CPU, with a tiny Qwen2 model and the shipped tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under `pytest -n N` (make test) the workers share the cores: each takes its share of torch threads
# (set before torch loads; subprocesses inherit it) instead of N workers each spinning on every core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A smaller model than model=tiny so every test step costs milliseconds (conf/debug/tiny.yaml holds the same).
TEST_MODEL = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_hidden_layers=2",
    "model.init.num_attention_heads=2", "model.init.num_key_value_heads=1",
]
QUIET = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


E2E = REPO / "tests" / "e2e"


def pytest_collection_modifyitems(items):
    """Everything under tests/e2e is marked `e2e` and `slow`, so `make test` (-m "not slow") leaves it out
    and a test added anywhere else, unmarked, is in the fast suite. Then the longest tests first: under
    `pytest -n` the run ends with many short tests spread over the workers, not with one worker alone on
    the ~10-minute demo chain."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: otherwise file order


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from llm_stages.data.demo import write_demo_data

    out = tmp_path_factory.mktemp("data") / "demo"
    write_demo_data(out, seed=0, n_train=400, n_val=64)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    from omegaconf import OmegaConf

    from llm_stages.models import load_tokenizer

    return load_tokenizer(OmegaConf.create({"name": "tiny"}))


@pytest.fixture
def make_cfg(tmp_path, demo_dir):
    """Compose the config of `python -m llm_stages <overrides>`, writing into tmp_path."""
    from llm_stages.config import compose

    def _make(*overrides: str, quiet: bool = True, output_dir: Path | None = None):
        """`quiet` with the tiny model: debug=tiny (TEST_MODEL and QUIET as a config; the overrides win)."""
        base = [f"paths.data_dir={demo_dir.parent}", f"paths.log_dir={tmp_path}/runs"]
        out = output_dir or tmp_path / "run"
        tiny = all(not o.startswith("model=") or o == "model=tiny" for o in overrides)
        if tiny and quiet:
            return compose([*base, "debug=tiny", *overrides], output_dir=str(out))
        overridden = {o.split("=")[0].lstrip("+~") for o in overrides}
        quiet_defaults = [q for q in QUIET if quiet and q.split("=")[0] not in overridden]
        return compose([*base, *(TEST_MODEL if tiny else []), *quiet_defaults, *overrides], output_dir=str(out))

    return _make
