"""TraceRL's trajectory slicing (spec §2.3, §7): replay each rollout's decoding trajectory as training rows.

Inside each response K-block the distinct first-unmask step ids u_1 < u_2 < ... are grouped s (= shrink) at a time
(the whole group maps to its last id). Round r asks, in every block at once, for the tokens of the block's r-th
group, given the block with every token of groups >= r masked and the earlier groups visible; blocks with nothing
left are copied clean. Pad positions carry step id (rollout max) + 1, so a block holding pads has one extra distinct
step; pads are never targets, and a round whose targets are only pads is dropped. Deterministic (no randomness).

Equivalent closed form used here: with q the 0-based rank of a position's step id among its block's distinct ids,
its group is g = q // s; round r targets g == r and masks g >= r; a rollout has max g + 1 rounds.
"""

from __future__ import annotations

import numpy as np

from dlmjax.rl.layout import Packed, block_offsets, response_blocks
from dlmjax.rl.masking import Rows, keep_nonempty


def _block_ranks(step_map, blocks):
    """(inv, start, end, uniq, g, lo, span): dense ranks of (block, step) over all rollouts (sorted), the first and
    last rank of each global block, the sorted keys, the [n, L1] global block id, and the key decoding constants."""
    sm = np.asarray(step_map, np.int64)
    blk = np.asarray(blocks, np.int64)
    n, l1 = sm.shape
    nb = int(blk.max()) + 1
    g = np.arange(n)[:, None] * nb + blk  # [n, L1] global block id
    lo = int(sm.min())
    span = int(sm.max()) - lo + 1
    key = g * span + (sm - lo)
    uniq, inv = np.unique(key.reshape(-1), return_inverse=True)  # dense rank of (block, step), sorted
    inv = inv.reshape(n, l1)
    start = np.full(n * nb, np.iinfo(np.int64).max)
    np.minimum.at(start, g.reshape(-1), inv.reshape(-1))
    end = np.full(n * nb, -1)
    np.maximum.at(end, g.reshape(-1), inv.reshape(-1))
    return inv, start, end, uniq, g, lo, span


def step_groups(step_map, blocks, shrink: int = 1):
    """[n, L1] int: the (shrunk) round index of every response position.

    step_map: [n, L1] int step ids (pads already = max + 1); blocks: [n, L1] int block index per position."""
    if np.shape(step_map)[0] == 0:
        return np.zeros(np.shape(step_map), np.int64)
    inv, start, _, _, g, _, _ = _block_ranks(step_map, blocks)
    return (inv - start[g]) // shrink


def shrunk_step_ids(step_map, blocks, shrink: int = 1):
    """[n, L1] int64: each position's step id after the shrink (spec §2.3 step 1; dLLM-RL `collapse_k_unique`):
    inside its block, the q-th (0-based) distinct id u_q becomes u_min(s (q // s + 1) - 1, U - 1), the last id of
    its group of s. shrink 1 = the step map itself. The value model's steps are these ids (spec §2.6)."""
    if np.shape(step_map)[0] == 0:
        return np.zeros(np.shape(step_map), np.int64)
    inv, start, end, uniq, g, lo, span = _block_ranks(step_map, blocks)
    q = inv - start[g]
    rank = np.minimum(start[g] + shrink * (q // shrink + 1) - 1, end[g])
    return uniq[rank] % span + lo


def tracerl_rows(packed: Packed, mask_id: int, k: int, shrink: int = 1, align: str = "response") -> Rows:
    """TraceRL rows, rollout by rollout, rounds in order (weight 1); empty (pad-only) rounds dropped."""
    if packed.step_map is None:
        raise ValueError("tracerl_rows: the rollouts carry no step map (pack_rollouts(step_maps=...))")
    blocks = response_blocks(block_offsets(packed.prompt_valid, k, align), packed.l1, k)
    grp = step_groups(packed.step_map, blocks, shrink)  # [n, L1]
    rounds = grp.max(-1) + 1  # [n]
    rollout = np.repeat(np.arange(packed.n), rounds)  # [R]
    r = np.concatenate([np.arange(c) for c in rounds]) if packed.n else np.zeros(0, np.int64)
    g = grp[rollout]  # [R, L1]
    masked_in = g >= r[:, None]
    noisy = np.where(masked_in, mask_id, packed.response[rollout])
    step = shrunk_step_ids(packed.step_map, blocks, shrink)[rollout]  # [R, L1]
    return keep_nonempty(rollout, noisy, g == r[:, None], np.ones(len(rollout), np.float32), packed.resp_valid,
                         step)
