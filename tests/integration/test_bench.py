"""bench/ (python -m bench): the runner completes every workload on both sides and reports numbers.

No timing is asserted anywhere: rates depend on the machine and its load. The smoke test checks
that each side ran its steps, in its own process, and reported positive rates and memory."""

from __future__ import annotations

import json

import pytest

from bench.clock import summarise


def test_summarise_times_the_window_after_warmup_and_counts_its_steps():
    steps = [{"start": 0.0, "end": 5.0, "tokens": 100, "samples": 2},  # warm-up: slow, not timed
             {"start": 5.5, "end": 6.0, "tokens": 40, "samples": 4},
             {"start": 6.5, "end": 7.0, "tokens": 60, "samples": 4, "generated_tokens": 30,
              "generation_seconds": 0.25, "update_tokens": 120, "update_seconds": 0.5}]
    out = summarise(steps, warmup=1)
    # The window runs from the warm-up step's end to the last step's end: gaps between steps count.
    assert out["timed_seconds"] == pytest.approx(2.0)
    assert out["steps_per_s"] == pytest.approx(1.0)
    assert out["tokens_per_s"] == pytest.approx(50.0)
    assert out["samples_per_s"] == pytest.approx(4.0)
    assert out["tokens_per_step"] == pytest.approx(50.0)
    assert out["rollout_tokens_per_s"] == pytest.approx(120.0)
    assert out["update_tokens_per_s"] == pytest.approx(240.0)
    with pytest.raises(ValueError):
        summarise(steps, warmup=3)


@pytest.mark.slow
def test_bench_runs_every_workload_against_its_baseline(tmp_path):
    pytest.importorskip("trl")
    from bench.runner import main
    from bench.workloads import WORKLOADS

    assert main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0

    [path] = tmp_path.glob("*-tiny.json")
    report = json.loads(path.read_text())
    assert report["meta"]["model"] == "tiny" and report["meta"]["versions"]["trl"] == "1.16.0"
    assert set(report["workloads"]) == set(WORKLOADS)
    for name, entry in report["workloads"].items():
        assert entry["baseline"] == ("naive" if name == "ppo" else "trl")
        for side in ("ours", entry["baseline"]):
            median = entry["sides"][side]["median"]
            assert "error" not in median, f"{name} {side}: {median.get('error')}"
            assert median["timed_steps"] == 2 and median["steps_recorded"] == 3, (name, side)
            for key in ("steps_per_s", "samples_per_s", "tokens_per_s", "peak_rss_mb"):
                assert median[key] > 0, (name, side, key)
            if entry["stage"] in ("grpo", "ppo"):
                assert median["rollout_tokens_per_s"] > 0 and median["update_tokens_per_s"] > 0, (name, side)
        assert entry["ratio"]["tokens_per_s"] > 0 and entry["ratio"]["peak_rss_mb"] > 0
        if name in ("sft", "rm", "dpo_precompute", "dpo_copy"):
            # Same token ids in the same order: both sides process exactly the same tokens per step.
            ours, base = (entry["sides"][s]["median"] for s in ("ours", entry["baseline"]))
            assert ours["tokens_per_step"] == base["tokens_per_step"], name
    table = path.with_suffix(".md").read_text()
    assert all(f"| {name} | ours |" in table for name in WORKLOADS)
    assert "| ppo | naive |" in table and "| sft | trl |" in table
