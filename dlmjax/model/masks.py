"""Attention masks [B, Lq, Lk] (True = query may attend to key) and the positions that go with them.

All masks are explicit boolean arrays; the family default is `default_mask`. Keys that are padding are never
visible; whether padded *queries* see anything is a family choice (LLaDA: yes, Dream: no; spec §2.4 / §3.4).
"""

from __future__ import annotations

import jax.numpy as jnp

from dlmjax.config import ModelConfig


def padding_mask(valid, mask_queries: bool = False):
    """Bidirectional attention over valid keys. valid: [B, L] bool -> [B, L, L]."""
    m = jnp.broadcast_to(valid[:, None, :], valid.shape + valid.shape[-1:])
    return m & valid[:, :, None] if mask_queries else m


def causal_mask(valid):
    """Token-causal attention (AR teachers): key j visible to query i iff j <= i and j is valid. [B, L] -> [B, L, L]."""
    n = valid.shape[-1]
    tri = jnp.tril(jnp.ones((n, n), bool))
    return tri[None] & valid[:, None, :]


def block_causal_mask(q_positions, k_positions, block_size: int, k_valid=None):
    """SDAR's staircase: key visible iff floor(pos_k / b) <= floor(pos_q / b), over absolute positions.

    q_positions: [B, Lq], k_positions: [B, Lk] int; k_valid: optional [B, Lk] bool -> [B, Lq, Lk].
    """
    m = (k_positions[:, None, :] // block_size) <= (q_positions[:, :, None] // block_size)
    return m if k_valid is None else m & k_valid[:, None, :]


def dream_positions(valid):
    """Dream's tok_idx for left-padded rows: cumsum(valid) - 1, pad slots set to 1 (spec §3.4). [B, L] int32."""
    pos = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
    return jnp.where(valid, pos, 1)


def default_positions(cfg: ModelConfig, valid):
    """Positions each family's reference uses for a (left-)padded batch: Dream re-indexes, the others use 0..L-1."""
    if cfg.family == "dream":
        return dream_positions(valid)
    return jnp.broadcast_to(jnp.arange(valid.shape[-1], dtype=jnp.int32), valid.shape)


def default_mask(cfg: ModelConfig, valid, positions=None):
    """The family's mask for a whole sequence without cache. valid: [B, L] bool."""
    if cfg.attention == "bidirectional":
        return padding_mask(valid, mask_queries=cfg.family == "dream")
    if cfg.attention == "causal":
        return causal_mask(valid)
    if positions is None:
        positions = default_positions(cfg, valid)
    return block_causal_mask(positions, positions, cfg.block_size, valid)
