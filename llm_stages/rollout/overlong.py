"""DAPO's overlong reward shaping (Yu et al. 2025, arXiv 2503.14476, eq. 13), off by default:
with `rollout.overlong_buffer` set, a reply that runs into the last `overlong_buffer` tokens of the
length limit (`rollout.generation.max_new_tokens`) loses reward in proportion, the whole
`rollout.overlong_penalty_factor` at the limit; as verl's DAPORewardManager (`overlong_buffer_cfg`).
The scorer adds it to the reward and logs it as the component `overlong` (env/reward/overlong).
DAPO's dynamic sampling is llm_stages.rollout.dynamic_sampling."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13 times `factor`: 0 while length <= max_length - buffer; ((max_length - buffer) -
    length) / buffer inside the buffer (-1 at max_length); -1 beyond max_length. `lengths` (N,)
    count a reply's tokens through its EOS, as verl's `valid_response_length`."""
    expected = max_length - buffer
    penalty = ((expected - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)
    return factor * penalty
