"""The transformer: embed -> lax.scan over stacked layers -> final norm -> LM head. Pure functions on a params pytree.

params = {"embed": [V, D],
          "layers": {"attn_norm": [NL, D], "wq": [NL, D, Hq, Dh], "wk"/"wv": [NL, D, Hkv, Dh], "wo": [NL, Hq, Dh, D],
                     ("bq": [NL, Hq, Dh], "bk"/"bv": [NL, Hkv, Dh])  qkv_bias only,
                     ("q_norm"/"k_norm": [NL, Dh])                    qk_norm only,
                     "mlp_norm": [NL, D], "w_gate"/"w_up": [NL, D, I], "w_down": [NL, I, D]},
          "final_norm": [D],
          ("lm_head": [V, D])  absent when tie_word_embeddings}

Layer loop. Stacked "layers" (above) run under lax.scan: one traced layer, the layout of training, checkpoints and
TPU/GPU. `unstack_layers` turns them into a tuple of per-layer dicts, which `hidden_states` runs as an unrolled
Python loop (MaxText's `scan_layers=False`). On XLA:CPU this is the faster decode path: a scan slices (copies) each
layer's weights and cache every iteration, and for bf16 stacks it converts the whole stack per call (BUILD_NOTES,
"Layer loop"). A cache built with `per_layer=True` pairs with it: k/v are tuples of [B, Hkv, Lmax, Dh].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig, param_shapes
from dlmjax.model import cache as kv
from dlmjax.model.layers import (F32, apply_rope, attention_cache_and_new, chunked_attention, dense, rms_norm,
                                  rope_tables, swiglu_mlp)


def init_params(cfg: ModelConfig, key, std: float = 0.02) -> dict:
    """Random params: normal(0, std) matrices and biases, ones for norm weights; dtype = cfg.param_dtype."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    dt = jnp.dtype(cfg.param_dtype)

    def make(path, shape, k):
        name = path[-1].key
        if name.endswith("norm"):
            return jnp.ones(shape, dt)
        return (std * jax.random.normal(k, shape, F32)).astype(dt)

    return jax.tree.unflatten(treedef, [make(p, s, k) for (p, s), k in zip(flat, keys)])


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    return jax.checkpoint(fn, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def _layer(cfg: ModelConfig, h, lp, cos, sin, mask, kc, vc, cache_index, causal_chunk: int = 0):
    """One pre-norm block. h: [B, L, D]; kc/vc: this layer's cache [B, Hkv, Lmax, Dh] or None.

    mask: without a cache [B|1, L, L] or None; with a cache the pair (over the cache slots as they were [B, L,
    Lmax], over this call's tokens [B, L, L]) that `hidden_states` derives once for all layers.

    Returns the new h and this call's (k, v) (post-RoPE, what the cache stores): [B, Hkv, L, Dh] with a cache,
    [B, L, Hkv, Dh] without.
    """
    dt = h.dtype
    lp = jax.tree.map(lambda w: w.astype(dt), lp)  # f32 master -> compute dtype, one layer at a time
    one_round = cfg.family == "sdar"
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps, one_round)
    q = dense(x, lp["wq"], "bld,dhk->blhk")
    k = dense(x, lp["wk"], "bld,dhk->blhk")
    v = dense(x, lp["wv"], "bld,dhk->blhk")
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, one_round)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, one_round)
    q = apply_rope(q, cos, sin, cfg.rope_full_precision)
    k = apply_rope(k, cos, sin, cfg.rope_full_precision)
    if kc is None:
        a = chunked_attention(q, k, v, mask, causal_chunk)
    else:  # head-major cache [B, Hkv, Lmax, Dh], read as is; this call's K/V are attended to separately
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        a = attention_cache_and_new(q, kc, vc, mask[0], k, v, mask[1])
    h = h + dense(a, lp["wo"], "blhk,hkd->bld")
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps, one_round)
    h = h + swiglu_mlp(x, lp["w_gate"], lp["w_up"], lp["w_down"])
    return h, (k, v)


_HALF = (jnp.bfloat16, jnp.float16)


def _to_bits(tree):
    """Half-precision leaves as uint16 bit patterns. Scanning over bf16 stacks makes XLA:CPU hoist an f32 convert of
    the whole [NL, ...] stack out of the loop on every call; scanning over the bits avoids it (bit-identical)."""
    return jax.tree.map(lambda w: jax.lax.bitcast_convert_type(w, jnp.uint16) if w.dtype in _HALF else w, tree)


def _from_bits(tree, dtype):
    return jax.tree.map(lambda w: jax.lax.bitcast_convert_type(w, dtype) if w.dtype == jnp.uint16 else w, tree)


def hidden_states(cfg: ModelConfig, params, tokens, positions, mask, cache=None, cache_index=None,
                  causal_chunk: int = 0):
    """Final-normed hidden states [B, L, D] (compute dtype) and the updated cache (or None).

    tokens, positions: [B, L] int; mask: [B or 1, L, Lk] bool with Lk = L without cache, Lk = Lmax with a cache,
    or None = every key visible (no masking work at all; with a cache: every written slot)
    (keys are cache slots; this call's tokens are written at slots [cache_index, cache_index + L) first, and only
    written slots are ever visible). causal_chunk > 0 (static) promises that no query sees a key at or beyond the
    end of its chunk of that many positions (causal / block-causal masks, no cache): attention skips those keys.
    """
    dt = jnp.dtype(cfg.compute_dtype)
    h = jnp.take(params["embed"], tokens, axis=0).astype(dt)  # [B, L, D]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    if cache is not None:
        if cache_index is None:
            raise ValueError("hidden_states: a cache needs a cache_index")
        n = tokens.shape[1]
        valid = kv.mark_valid(cache["valid"], n, cache_index)
        mask = valid[:, None, :] if mask is None else mask & valid[:, None, :]  # [B, L, Lmax] over the slots
        start = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (tokens.shape[0],))[:, None]
        slots = jnp.arange(valid.shape[1])[None]
        overwritten = (slots >= start) & (slots < start + n)  # [B, Lmax]: this call's slots
        cols = jnp.minimum(start + jnp.arange(n)[None], valid.shape[1] - 1)  # [B, L]
        mask = (mask & ~overwritten[:, None, :],  # (cache as it was minus the slots this call writes, own tokens)
                jnp.take_along_axis(mask, jnp.broadcast_to(cols[:, None, :], (mask.shape[0], n, n)), axis=2))

    if is_unstacked(params):
        return _hidden_states_unrolled(cfg, params, h, cos, sin, mask, cache, cache_index, causal_chunk,
                                       None if cache is None else valid)
    half = {w.dtype for w in jax.tree.leaves(params["layers"]) if w.dtype in _HALF}
    if len(half) > 1:
        raise ValueError(f"layer params mix half dtypes {sorted(map(str, half))}")
    half_dt = half.pop() if half else None
    cache_dt = None if cache is None else cache["k"].dtype

    def body(h, xs):
        lp, kc, vc = xs
        lp = _from_bits(lp, half_dt) if half_dt is not None else lp
        if kc is not None and kc.dtype == jnp.uint16:
            kc, vc = jax.lax.bitcast_convert_type(kc, cache_dt), jax.lax.bitcast_convert_type(vc, cache_dt)
        h, kv_new = _layer(cfg, h, lp, cos, sin, mask, kc, vc, cache_index, causal_chunk)
        return h, kv_new

    body = _remat(body, cfg.remat)
    layers = _to_bits(params["layers"])
    xs = (layers, None, None) if cache is None else (layers, *_to_bits((cache["k"], cache["v"])))
    h, (k_new, v_new) = jax.lax.scan(body, h, xs)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.family == "sdar")
    if cache is None:
        return h, None
    new_cache = {"k": kv.write_rows(cache["k"], k_new, cache_index, axis=3, batch_axis=1),
                 "v": kv.write_rows(cache["v"], v_new, cache_index, axis=3, batch_axis=1), "valid": valid}
    return h, new_cache


def is_unstacked(params) -> bool:
    """True when params["layers"] is a tuple of per-layer dicts (see `unstack_layers`)."""
    return isinstance(params["layers"], (tuple, list))


def unstack_layers(params) -> dict:
    """Params whose "layers" is a tuple of NL per-layer dicts (leaves [...] without the NL axis): the unrolled
    layer loop. The input is not modified: both layouts are alive until the caller drops the stacked params (the
    decode job rebinds its only reference), so the peak is twice the layer weights for the duration of the call."""
    if is_unstacked(params):
        return params
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple({name: w[i] for name, w in stacked.items()} for i in range(n))}


def stack_layers(params) -> dict:
    """Inverse of `unstack_layers`: "layers" back to one dict of [NL, ...] stacks."""
    if not is_unstacked(params):
        return params
    layers = params["layers"]
    return {**params, "layers": {name: jnp.stack([lp[name] for lp in layers]) for name in layers[0]}}


def _after(x, dep):
    """x, made data-dependent on `dep`: x + min(|dep[0]|, 0), which is x for any dep[0] but NaN (XLA cannot fold it
    away). The per-layer cache writes then follow every read of the cache, so XLA writes the donated buffers in
    place instead of copying each one first (tested on the compiled HLO)."""
    d = jax.lax.stop_gradient(dep).reshape(-1)[0].astype(x.dtype)
    return x + jnp.minimum(jnp.abs(d), jnp.zeros((), x.dtype))


def _hidden_states_unrolled(cfg: ModelConfig, params, h, cos, sin, mask, cache, cache_index, causal_chunk, valid):
    """`hidden_states` over a tuple of per-layer params (an unrolled Python loop; same `_layer`, same remat)."""
    def layer(h, lp, kc, vc):
        return _layer(cfg, h, lp, cos, sin, mask, kc, vc, cache_index, causal_chunk)

    layer = _remat(layer, cfg.remat)
    new_kv = []
    for i, lp in enumerate(params["layers"]):
        kc, vc = (None, None) if cache is None else (cache["k"][i], cache["v"][i])
        h, kv_new = layer(h, lp, kc, vc)
        new_kv.append(kv_new)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.family == "sdar")
    if cache is None:
        return h, None
    write = lambda buf, new: kv.write_rows(buf, _after(new, h), cache_index, axis=2, batch_axis=0)  # noqa: E731
    return h, {"k": tuple(write(cache["k"][i], k) for i, (k, _) in enumerate(new_kv)),
               "v": tuple(write(cache["v"][i], v) for i, (_, v) in enumerate(new_kv)), "valid": valid}


def lm_head(cfg: ModelConfig, params, h):
    """Logits [..., V] in the compute dtype (the references return model-dtype logits, spec N1); f32 accumulation."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", h, w.astype(h.dtype), preferred_element_type=F32).astype(h.dtype)


def forward(cfg: ModelConfig, params, tokens, positions, mask, cache=None, cache_index=None, causal_chunk: int = 0):
    """Logits [B, L, V]; with a cache, (logits, updated cache). See `hidden_states` for the arguments."""
    h, new_cache = hidden_states(cfg, params, tokens, positions, mask, cache, cache_index, causal_chunk)
    logits = lm_head(cfg, params, h)
    return logits if cache is None else (logits, new_cache)


def shift_logits(logits):
    """Dream's alignment (spec §1.6): position i is predicted by logits at i-1; position 0 keeps its own.

    Decoders and losses of `logit_shift` families call this; the forward itself never shifts.
    """
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 5))
def forward_jit(cfg: ModelConfig, params, tokens, positions, mask, causal_chunk: int = 0):
    """Jitted uncached forward (cfg and causal_chunk are static: frozen dataclasses hash by value)."""
    return forward(cfg, params, tokens, positions, mask, causal_chunk=causal_chunk)
