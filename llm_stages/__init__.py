"""llm_stages: the LLM training pipeline as small Lightning stages configured with Hydra."""

__version__ = "0.1.0"
