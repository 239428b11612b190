"""Rewards and scorers: the registry (eval + RL), the math reward, the code reward and its sandbox."""

from dlmjax.rewards.registry import SCORERS, get_scorer  # noqa: F401
