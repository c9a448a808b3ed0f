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


@pytest.mark.longest
@pytest.mark.slow
def test_bench_runs_every_workload_against_its_baseline(tmp_path):
    pytest.importorskip("trl")
    from bench.runner import main
    from bench.workloads import WORKLOADS

    # The shared-prompt rows run the same stages as rm / dpo_precompute: only dpo_long (shared prompts, the
    # long-prompt data) is smoke-tested, to keep this test cheap.
    # grpo_vllm (our GRPO on vLLM) needs `make vllm`: tests/integration/test_vllm_backend.py covers it.
    names = [n for n in WORKLOADS if n not in ("rm_shared", "dpo_shared", "rm_long", "grpo_vllm")]
    # --peak-tflops: any peak, so the MFU column is computed and written on CPU too
    assert main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1", "--peak-tflops", "1",
                 "--workloads", ",".join(names), "--out-dir", str(tmp_path)]) == 0

    [path] = tmp_path.glob("*-tiny-*.json")
    report = json.loads(path.read_text())
    assert report["meta"]["model"] == "tiny" and report["meta"]["versions"]["trl"] == "1.16.0"
    assert set(report["workloads"]) == set(names)
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
        if name in ("sft", "rm", "dpo_precompute", "dpo_copy", "dpo_long"):
            # Same token ids in the same order: both sides process exactly the same tokens per step.
            ours, base = (entry["sides"][s]["median"] for s in ("ours", entry["baseline"]))
            assert ours["tokens_per_step"] == base["tokens_per_step"], name
    table = path.with_suffix(".md").read_text()
    assert all(f"| {name} | ours |" in table for name in names)
    assert "| ppo | naive |" in table and "| sft | trl |" in table and "| MFU |" in table
    assert report["workloads"]["sft"]["sides"]["ours"]["median"]["mfu"] > 0
    assert "mfu" not in report["workloads"]["grpo"]["sides"]["ours"]["median"]
