"""Rollouts for the RL stages: sampling replies (HF generate or a vLLM server), scoring them (rule
rewards, a reward model), dynamic sampling and overlong shaping, and the typed trajectory they make."""
