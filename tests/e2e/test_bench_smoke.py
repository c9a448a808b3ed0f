"""bench/ (python -m bench) end to end: every workload on both sides (ours and its baseline, TRL), each
in its own process, on the tiny model. No timing is asserted: rates depend on the machine and its load."""

from __future__ import annotations

import json

import pytest


@pytest.mark.longest
@pytest.mark.slow
def test_bench_runs_every_workload_against_its_baseline(tmp_path):
    pytest.importorskip("trl")
    from bench.runner import main
    from bench.workloads import WORKLOADS

    # The shared-prompt rows run the same stages as rm / dpo_precompute: only dpo_long (shared prompts, the
    # long-prompt data) is smoke-tested, to keep this test cheap.
    # grpo_vllm (our GRPO on vLLM) needs `make vllm`: tests/e2e/test_vllm_backend.py covers it; the 2,048-token
    # workloads: tests/e2e/test_bench_long_context.py.
    names = [n for n in WORKLOADS if n not in ("rm_shared", "dpo_shared", "rm_long", "grpo_vllm")
             and WORKLOADS[n].max_length <= 512]
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
