"""Training rows with random masks: SLIM-RL's quadrature replicas (spec §1.3-§1.4, §7) and dLLM-RL's random-masking
and coupled rows (§2.7, §7). Host-side NumPy, deterministic given the `np.random.Generator` the caller passes.

A row asks the model to denoise one masked copy of a rollout's response. Masks are i.i.d. per token (no importance
or difficulty); pads are never targets (post_num = 0) and rows left without a target are dropped, without
re-weighting the others.

Random stream (part of the contract: the same generator state gives the same rows):
  slim:    for each rollout in order, for each node k in order: u = rng.random(L1, float32); if nothing is masked,
           pos = rng.integers(L1).
  random:  for each rollout in order: u = rng.random(L1, float32), then v = rng.uniform(lower, upper, L1) as float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dlmjax.rl.layout import Packed, block_offsets, response_blocks
from dlmjax.rl.quadrature import block_schedule, gauss_legendre


@dataclasses.dataclass(frozen=True)
class Rows:
    """R training rows of one outer step, in the order they are trained."""

    rollout: np.ndarray  # [R] int32 index of the source rollout in the Packed
    noisy: np.ndarray  # [R, L1] int32 the noisy response copy (masked positions = mask id, pads masked stay mask)
    targets: np.ndarray  # [R, L1] bool positions whose clean token is predicted (masked and non-pad)
    weight: np.ndarray  # [R] float32 quadrature weight (1 for TraceRL / random rows)
    # [R, L1] int64 TraceRL only (else None): the (shrunk) step id of each target, -1 off-target -- what the value
    # model's step-level returns group by (spec §2.6; dLLM-RL train_sdar_value.py `sel_step_tail_rows`)
    step: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rollout.shape[0])


def keep_nonempty(rollout, noisy, masked, weight, resp_valid, step=None) -> Rows:
    """Rows from stacked candidates: targets = masked & non-pad, rows without a target dropped (order kept).
    step: optional [R, L1] step id per position (kept on targets, -1 elsewhere)."""
    rollout = np.asarray(rollout, np.int32).reshape(-1)
    l1 = resp_valid.shape[1]
    noisy = np.asarray(noisy, np.int32).reshape(-1, l1)
    targets = np.asarray(masked, bool).reshape(-1, l1) & resp_valid[rollout]
    keep = targets.any(-1)
    if step is not None:
        step = np.where(targets, np.asarray(step, np.int64).reshape(-1, l1), -1)[keep]
    return Rows(rollout[keep], noisy[keep], targets[keep], np.asarray(weight, np.float32).reshape(-1)[keep], step)


def slim_masks(packed: Packed, rng: np.random.Generator, k: int, n_points: int = 3, spread: float = 0.2,
               shape: str = "cosine", increasing: bool = False, align: str = "response"):
    """(masked [n, n_points, L1] bool, weights [n_points] f64): SLIM's Bernoulli masks, before pads are dropped.

    Replica (i, q) masks response position t of block j iff u_t <= p_j(t_q) (float32 compare); if nothing at all is
    masked (pads included), one position drawn uniformly over the padded L1 is forced (it may be a pad)."""
    nodes, weights = gauss_legendre(n_points)
    n, l1 = packed.n, packed.l1
    blocks = response_blocks(block_offsets(packed.prompt_valid, k, align), l1, k)  # [n, L1]
    nblk = blocks[:, -1] + 1  # [n] J per row (all equal under "response" alignment)
    sched = {(q, int(j)): block_schedule(float(t), int(j), spread, shape, increasing)
             for q, t in enumerate(nodes) for j in np.unique(nblk)}
    masked = np.zeros((n, n_points, l1), bool)
    for i in range(n):
        for q in range(n_points):
            p_tok = sched[(q, int(nblk[i]))][blocks[i]]  # [L1] float32
            m = rng.random(l1, dtype=np.float32) <= p_tok
            if not m.any():
                m[rng.integers(l1)] = True
            masked[i, q] = m
    return masked, weights


def slim_rows(packed: Packed, mask_id: int, rng: np.random.Generator, k: int, n_points: int = 3,
              spread: float = 0.2, shape: str = "cosine", increasing: bool = False, align: str = "response") -> Rows:
    """SLIM-RL rows: n_points replicas per rollout (adjacent, node order), weight w_q, empty ones dropped."""
    masked, weights = slim_masks(packed, rng, k, n_points, spread, shape, increasing, align)
    n = packed.n
    noisy = np.where(masked, mask_id, packed.response[:, None, :])  # [n, Q, L1]
    rollout = np.repeat(np.arange(n), n_points)
    return keep_nonempty(rollout, noisy, masked, np.tile(weights, n), packed.resp_valid)


def random_masks(packed: Packed, rng: np.random.Generator, lower: float = 0.1, upper: float = 0.9):
    """[n, L1] bool: mask iff u <= v, u ~ U[0, 1), v ~ U(lower, upper) drawn fresh per token (float32); no
    force-mask (spec §2.7, §7)."""
    n, l1 = packed.n, packed.l1
    masked = np.zeros((n, l1), bool)
    for i in range(n):
        u = rng.random(l1, dtype=np.float32)
        v = rng.uniform(lower, upper, l1).astype(np.float32)
        masked[i] = u <= v
    return masked


def random_rows(packed: Packed, mask_id: int, rng: np.random.Generator, lower: float = 0.1, upper: float = 0.9,
                coupled: bool = False) -> Rows:
    """Random-masking rows (one per rollout, weight 1); `coupled` appends every complement row (mask = not mask)
    after all primary rows (dLLM-RL's order). Pads are dropped from the targets and empty rows dropped."""
    masked = random_masks(packed, rng, lower, upper)
    if coupled:
        masked = np.concatenate([masked, ~masked], axis=0)
    rollout = np.tile(np.arange(packed.n), 2 if coupled else 1)
    noisy = np.where(masked, mask_id, packed.response[rollout])
    return keep_nonempty(rollout, noisy, masked, np.ones(len(rollout), np.float32), packed.resp_valid)
