"""Group advantages and group filters (spec §1.6, §2.5, §7). Host-side NumPy, float64 statistics.

rewards come as [groups, G] (G rollouts of one prompt per row). The advantage of a rollout is broadcast unchanged to
every row (and token) built from it.
"""

from __future__ import annotations

import numpy as np


def group_advantages(rewards, method: str = "dr_grpo"):
    """[groups, G] float32 advantages. dr_grpo: r - group mean (SLIM-RL); z_score: (r - mean) / population std,
    0 for a group whose std is exactly 0 (TraceRL)."""
    r = np.asarray(rewards, np.float64)
    centred = r - r.mean(-1, keepdims=True)
    if method == "dr_grpo":
        return centred.astype(np.float32)
    if method == "z_score":
        std = r.std(-1, keepdims=True)  # population std (ddof 0)
        return np.where(std == 0, 0.0, centred / np.where(std == 0, 1.0, std)).astype(np.float32)
    raise ValueError(f"group_advantages: method={method!r} is not dr_grpo | z_score")


def group_filter(rewards, advantages, kind: str = "math", low: float = 0.2, high: float = 0.8):
    """[groups] bool: which groups are trained on. math: low <= mean reward <= high (both inclusive; with G = 8:
    2..6 correct); code: drop a group whose advantages are all exactly 0; none: keep all."""
    r = np.asarray(rewards, np.float64)
    if kind == "math":
        m = r.mean(-1)
        return (m >= low) & (m <= high)
    if kind == "code":
        return np.any(np.asarray(advantages) != 0, axis=-1)
    if kind == "none":
        return np.ones(r.shape[0], bool)
    raise ValueError(f"group_filter: kind={kind!r} is not math | code | none")
