"""Evaluation of trained models (the eval stage, its tasks, and the lm-evaluation-harness adapter)."""
