"""Pure loss functions: tensors in, tensors out; no models, configs or logging inside."""

from llm_stages.losses.causal import token_cross_entropy

__all__ = ["token_cross_entropy"]
