"""SLIM-RL's deterministic masking levels (spec §1.3) and its per-block mask schedule (§1.4, §7). Host-side NumPy.

Each kept rollout is replicated once per Gauss-Legendre node t_k (weight w_k); inside replica k the response block j
is masked i.i.d. per token with probability p_j(t_k), a cosine profile around t_k whose block mean is exactly t_k.
"""

from __future__ import annotations

import numpy as np


def gauss_legendre(n: int):
    """Gauss-Legendre nodes and weights on [0, 1]: t [n] f64 ascending, w [n] f64 with sum(w) = 1.

    leggauss gives the rule on [-1, 1]; t = (x + 1) / 2, w = w_GL / 2 (SLIM's get_gdpo_config). n = 3:
    t = (1 -+ sqrt(3/5)) / 2 and 1/2, w = 5/18, 8/18, 5/18."""
    if n <= 0:
        raise ValueError(f"gauss_legendre: n={n} must be > 0")
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


def num_blocks(l1: int, k: int) -> int:
    """J = floor((L1 - 1) / K) + 1: K-blocks covering the padded response length L1 (trailing pad blocks count)."""
    return (max(l1, 1) - 1) // k + 1


def block_schedule(t: float, j: int, spread: float = 0.2, shape: str = "cosine", increasing: bool = False):
    """Per-block mask probabilities p [J] float32 for node t (float32 throughout, as the reference computes it).

    sigma = max(0, min(spread, 2 min(t, 1 - t) - 1e-6)) keeps every p in (0, 1).
    cosine: p = t + sigma (0.5 (1 - cos(pi x)) - 0.5) on x = linspace(0, 1, J) (increasing); linear: linspace(t -
    sigma/2, t + sigma/2, J). Unless `increasing`, the profile is flipped: block 0 is the most masked. J = 1: [t]."""
    if j <= 1:
        return np.full((max(j, 1),), t, np.float32)
    sigma = max(0.0, min(spread, 2.0 * min(t, 1.0 - t) - 1e-6))
    t32, s32 = np.float32(t), np.float32(sigma)
    if shape == "cosine":
        x = np.linspace(0.0, 1.0, j, dtype=np.float32)  # [J]
        curve = np.float32(0.5) * (np.float32(1.0) - np.cos(np.float32(np.pi) * x)) - np.float32(0.5)
        p = t32 + s32 * curve
    elif shape == "linear":
        p = np.linspace(t32 - s32 / np.float32(2), t32 + s32 / np.float32(2), j, dtype=np.float32)
    else:
        raise ValueError(f"block_schedule: shape={shape!r} is not cosine | linear")
    p = p.astype(np.float32)
    return p if increasing else p[::-1].copy()
