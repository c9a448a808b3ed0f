"""Pure loss functions: tensors in, tensors out; no models, configs or logging inside."""

from llm_stages.losses.causal import token_cross_entropy
from llm_stages.losses.preference import PREFERENCE_LOSSES, dpo_loss, loss_settings, orpo_loss, simpo_loss

__all__ = ["PREFERENCE_LOSSES", "dpo_loss", "loss_settings", "orpo_loss", "simpo_loss", "token_cross_entropy"]
