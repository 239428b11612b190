"""Fixed-size KV cache for block decoding: k, v [layers, B, Hkv, Lmax, D] (or per-layer tuples of [B, Hkv, Lmax, D]
for unstacked params) and a validity mask [B, Lmax].

Head-major, the layout attention reads, so a forward against the cache never transposes it.

Slots are written with `dynamic_update_slice` at a write index (scalar, or one per row); nothing grows in Python.
A forward with a cache writes this call's K/V at the index and attends over all Lmax slots, restricted to slots
that have been written (`valid`). "Read-only" steps (SDAR denoising steps) simply drop the returned cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> dict:
    """Empty cache. per_layer=True (for unstacked params, `transformer.unstack_layers`): k and v are tuples of NL
    arrays [B, Hkv, Lmax, D] instead of one [NL, ...] stack."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    valid = jnp.zeros((batch, max_len), bool)
    if per_layer:
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # noqa: E731
        return {"k": zeros(), "v": zeros(), "valid": valid}
    shape = (cfg.num_layers, *shape)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "valid": valid}


def write_rows(buf, new, index, axis: int, batch_axis: int | None = None):
    """Write `new` into `buf` at `index` along `axis` (the sequence axis). index: scalar or [B] (one per row).

    The batch axis is `batch_axis` (default `axis - 1`). A per-row index becomes a vmapped dynamic_update_slice.
    """
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), index, axis)
    b_axis = axis - 1 if batch_axis is None else batch_axis
    inner = axis - 1 if b_axis < axis else axis  # the sequence axis once the batch axis is mapped away
    f = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, inner)
    return jax.vmap(f, in_axes=(b_axis, b_axis, 0), out_axes=b_axis)(buf, new.astype(buf.dtype), index)


def mark_valid(valid, length: int, index):
    """Set slots [index, index + length) of every row to True. valid: [B, Lmax]."""
    return write_rows(valid, jnp.ones((valid.shape[0], length), bool), index, axis=1)


def slot_positions(batch: int, max_len: int):
    """Absolute position held by each cache slot when slot s holds position s (left-aligned rows): [B, Lmax]."""
    return jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
