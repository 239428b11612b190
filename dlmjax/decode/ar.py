"""Greedy autoregressive decoding with the KV cache, one jit: the AR teacher path and a real-weight check of the cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax import model as M


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy_generate(cfg: ModelConfig, params, prompt, num_new: int):
    """prompt: [B, Lp] int32 (no padding) -> [B, num_new] greedy tokens. No stop token: exactly num_new steps.

    Prefill writes the prompt's K/V; each step feeds one token at position Lp + t against the cache (causal).
    """
    b, lp = prompt.shape
    lmax = lp + num_new
    slots = jnp.broadcast_to(jnp.arange(lmax, dtype=jnp.int32), (b, lmax))
    cache = M.init_cache(cfg, b, lmax, per_layer=M.is_unstacked(params))
    pos = slots[:, :lp]
    mask = slots[:, None, :] <= pos[:, :, None]  # [B, Lp, Lmax] causal over slots
    logits, cache = M.forward(cfg, params, prompt, pos, mask, cache, 0)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(first)

    def step(t, carry):
        out, cache = carry
        p = jnp.full((b, 1), lp + t - 1, jnp.int32)
        tok = jax.lax.dynamic_slice_in_dim(out, t - 1, 1, axis=1)
        m = slots[:, None, :] <= p[:, :, None]
        lg, cache = M.forward(cfg, params, tok, p, m, cache, lp + t - 1)
        nxt = jnp.argmax(lg[:, -1], axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1), cache

    out, _ = jax.lax.fori_loop(1, num_new, step, (out, cache))
    return out
