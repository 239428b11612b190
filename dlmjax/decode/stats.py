"""Decoding statistics from step maps: tokens per forward (TPF) and expected wrong commits (slimrl_tracerl.md §0.4)."""

from __future__ import annotations

import jax.numpy as jnp


def distinct_steps(step_map, keep):
    """Number of distinct positive step ids per row among kept positions. step_map: [B, N] int, keep: [B, N] bool."""
    s = jnp.where(keep & (step_map > 0), step_map, 0)
    s = jnp.sort(s, axis=1)
    new = (s > 0) & jnp.concatenate([jnp.ones_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], axis=1)
    return jnp.sum(new, axis=1)


def tokens_per_forward(step_map, keep):
    """TPF per row = #committed kept tokens / #distinct commit steps (step 0 = never decoded, excluded).

    Rows with no decoded token get 0. The cache-writing ("SAVING") forwards are not counted, as in the reference.
    """
    n_tok = jnp.sum(keep & (step_map > 0), axis=1)
    n_steps = distinct_steps(step_map, keep)
    return jnp.where(n_steps > 0, n_tok / jnp.maximum(n_steps, 1), 0.0).astype(jnp.float32)
