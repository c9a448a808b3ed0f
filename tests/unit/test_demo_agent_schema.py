"""The agent demo's SFT transcripts show the calculator's schema exactly as the RL prompts will: the
tiny model reads the schema turn as fixed text, so a different one at GRPO time is a prompt it never saw."""

from __future__ import annotations

from llm_stages.data.demo_agent import CALCULATOR_SCHEMA


def test_schema_is_the_calculators_own():
    from llm_stages.rollout.builtin_tools import calculator
    from llm_stages.rollout.tools import tool_from_callable

    assert tool_from_callable(calculator).schema == CALCULATOR_SCHEMA
