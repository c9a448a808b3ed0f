"""bench/ (python -m bench): how a run's steps become rates and the report's table (tests/e2e/test_bench_smoke.py
runs every workload on both sides)."""

from __future__ import annotations

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


def test_mfu_is_model_flops_per_second_over_the_peak_and_gets_a_column_when_the_peak_is_known():
    from bench.runner import add_mfu, markdown

    sft = {"tokens_per_s": 30_000.0}
    add_mfu(sft, params=500_000_000, flops_per_param_token=6, peak_tflops=1000.0)
    assert sft["mfu"] == pytest.approx(6 * 5e8 * 3e4 / 1e15)  # 0.09
    rl = {"tokens_per_s": 30_000.0}
    add_mfu(rl, params=500_000_000, flops_per_param_token=None, peak_tflops=1000.0)  # RL: not reported
    no_peak = {"tokens_per_s": 30_000.0}
    add_mfu(no_peak, params=500_000_000, flops_per_param_token=6, peak_tflops=None)
    assert "mfu" not in rl and "mfu" not in no_peak

    meta = {"model": "m", "device": "d", "date": "today", "commit": "c", "warmup": 1, "repeats": 1, "trainer": "gpu",
            "versions": {"trl": "1.16.0"}, "parameters": 5e8, "peak_tflops": 1000.0}
    side = {"timed_steps": 2, "tokens_per_step": 10, "steps_per_s": 1.0, "samples_per_s": 1.0, "tokens_per_s": 3e4,
            "peak_rss_mb": 1.0, "cuda_max_allocated_mb": 2.0, "wall_s": 3.0}
    report = {"meta": meta, "workloads": {"sft": {"baseline": "trl", "settings": {"caveat": ""}, "notes": [],
                                                  "sides": {"ours": {"median": {**side, "mfu": 0.09}},
                                                            "trl": {"median": {**side, "mfu": 0.045}}},
                                                  "ratio": {"tokens_per_s": 2.0}}}}
    table = markdown(report)
    header = next(line for line in table.splitlines() if line.startswith("| workload"))
    assert "| CUDA max alloc (MB) | MFU |" in header
    rows = [line for line in table.splitlines() if line.startswith("| sft")]
    assert "| 9.0% |" in rows[0] and "| 4.5% |" in rows[1]
    assert all(row.count("|") == header.count("|") for row in rows)
    meta["peak_tflops"] = None
    assert "MFU" not in markdown(report)


def test_each_side_runs_in_the_environment_the_bench_was_started_with(monkeypatch, tmp_path):
    """What loading our model in the runner's process sets (lean activations' TRANSFORMERS_SDPA_FORCE_GQA on
    a machine without CUDA) does not reach the sides' processes: TRL's must not run with our settings."""
    import resource

    from bench import runner
    from llm_stages.lean_layers import GQA_WITHOUT_COPIES

    monkeypatch.delitem(runner.LAUNCH_ENV, GQA_WITHOUT_COPIES, raising=False)
    monkeypatch.setenv(GQA_WITHOUT_COPIES, "1")
    seen = {}

    class Child:
        pid = 12345

    def popen(args, cwd, env, stdout, stderr):
        seen.update(env)
        return Child()

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    monkeypatch.setattr(runner.os, "wait4", lambda pid, options: (pid, 1 << 8, resource.getrusage(resource.RUSAGE_SELF)))
    assert "error" in runner.run_child({"result_path": str(tmp_path / "none.json")}, tmp_path, "trl-0")
    assert GQA_WITHOUT_COPIES not in seen and str(runner.REPO) in seen["PYTHONPATH"]
