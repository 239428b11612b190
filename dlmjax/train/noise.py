"""Forward-process corruption for masked-diffusion training: schedules, time sampling, masks and loss weights.

Pure functions of explicit uniforms so that tests can restate them in NumPy. Randomness is drawn per *global row*
(`row_uniforms`): a row's noise depends only on (step key, row index), never on how the batch is sharded or split
into gradient-accumulation micro-batches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


# --- schedules (md4 / dLLM `alpha.py`): alpha(t) = P(token kept), mask prob p = 1 - alpha, ELBO weight ------------

def mask_prob(schedule: str, t):
    """1 - alpha(t): linear -> t; cosine -> cos(pi/2 (1 - t))."""
    if schedule == "linear":
        return t
    return jnp.cos(0.5 * math.pi * (1.0 - t))


def elbo_weight(schedule: str, t):
    """-alpha'(t) / (1 - alpha(t) + 1e-6) as dLLM computes it (linear: 1 / (t + 1e-6))."""
    if schedule == "linear":
        return 1.0 / (t + 1e-6)
    d_alpha = -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))
    return -d_alpha / (jnp.cos(0.5 * math.pi * (1.0 - t)) + 1e-6)


# --- randomness ------------------------------------------------------------------------------------------------------

def row_keys(key, rows):
    """Per-row key data [B, 2] uint32 = fold_in(key, global row index): what a batch builder places in the batch."""
    return jax.vmap(lambda r: jax.random.key_data(jax.random.fold_in(key, r)))(rows)


def uniforms_from_row_keys(keys, length: int, n_scalars: int):
    """Per-row uniforms (scalars [B, n_scalars], per-token [B, L]) from per-row key data [B, 2] (row_keys)."""
    def one(k):
        k_s, k_t = jax.random.split(jax.random.wrap_key_data(k))
        return jax.random.uniform(k_s, (n_scalars,), F32), jax.random.uniform(k_t, (length,), F32)

    return jax.vmap(one)(keys)


def row_uniforms(key, rows, length: int, n_scalars: int):
    """Per-row uniforms: (scalars [B, n_scalars], per-token [B, L]) from fold_in(key, global row index)."""
    return uniforms_from_row_keys(row_keys(key, rows), length, n_scalars)


def sample_times(u, eps: float, antithetic: bool = False, rows=None, n_rows: int | None = None, u0=None):
    """t = eps + (1 - eps) * v with v = u, or with antithetic sampling v = frac(u0 + row / n_rows) (md4)."""
    if antithetic:
        u = jnp.mod(u0 + rows.astype(F32) / n_rows, 1.0)
    return eps + (1.0 - eps) * u


# --- masks and weights ----------------------------------------------------------------------------------------------

def mdlm_mask(t, u_tok, maskable, schedule: str = "linear"):
    """masked = (u < p(t)) & maskable, p broadcast over the row. t: [B]; u_tok: [B, L]; maskable: [B, L] bool."""
    p = mask_prob(schedule, t)[:, None]
    return (u_tok < p) & maskable


def cart_weight(masked, p: float = 0.3):
    """Dream's CART weight: masked i gets sum over unmasked j != i of 0.5 p (1 - p)^(|i-j| - 1). [B, L] f32."""
    n = masked.shape[-1]
    d = np.abs(np.arange(n)[None, :] - np.arange(n)[:, None])
    geo = 0.5 * p * (1.0 - p) ** np.maximum(d - 1, 0)
    geo[d == 0] = 0.0
    w = (~masked).astype(F32) @ jnp.asarray(geo.T, F32)
    return w * masked


def trims_mask(u_sel, u_k, t, u_tok, maskable, bucket, *, num_buckets: int, p_high: float, p_low: float, rho: float,
               k_range: str, schedule: str = "linear"):
    """TRIMS trajectory masking (spec §5.3/§5.5) mixed with standard MDLM on the other rows.

    Returns (masked [B, L], p [B, L] per-token mask probability, traj [B] bool, k [B] int32).
    Row b is a trajectory row iff u_sel < rho; its stage k is drawn from U{0..K-1} (k_range "zero") or U{1..K};
    response tokens with bucket > k ("future", easier) are masked with p_high, the others ("context") with p_low.
    """
    traj = u_sel < rho
    lo = 0 if k_range == "zero" else 1
    k = lo + jnp.minimum(jnp.floor(u_k * num_buckets), num_buckets - 1).astype(jnp.int32)
    p_traj = jnp.where(bucket.astype(jnp.int32) > k[:, None], p_high, p_low)
    p_std = jnp.broadcast_to(mask_prob(schedule, t)[:, None], u_tok.shape)
    p = jnp.where(traj[:, None], p_traj, p_std) * maskable
    return u_tok < p, p, traj, k


def bd3lm_attention_mask(length: int, block_size: int) -> np.ndarray:
    """BD3-LM's [x_t ; x_0] mask over 2L (spec §4): M_BD | M_OBC | M_BC. Static per (L, block); [2L, 2L] bool."""
    idx = np.arange(2 * length)
    clean = idx >= length
    blk = (idx % length) // block_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_blk, k_blk = blk[:, None], blk[None, :]
    diag = (q_blk == k_blk) & (q_clean == k_clean)
    offset = ~q_clean & k_clean & (q_blk > k_blk)
    causal = q_clean & k_clean & (q_blk >= k_blk)
    return diag | offset | causal
