"""Building blocks of the transformer: RMSNorm, RoPE, SwiGLU MLP and grouped-query attention.

Numerics mirror the reference PyTorch code (spec models_decoders.md §1.5); each choice is listed in BUILD_NOTES.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def rms_norm(x, weight, eps: float, one_round: bool = False):
    """RMSNorm over the last axis, statistics in f32.

    two-round (HF Llama/Qwen, LLaDA, Dream): w * cast(x32 * rsqrt(mean(x32²) + eps)) -- the product in x's dtype.
    one-round (SDAR's fused Triton kernel, spec N2): cast(w32 * x32 * rsqrt(...)).
    """
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if one_round:
        return (y * weight.astype(F32)).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
    """cos/sin tables [B, L, head_dim] in f32 for absolute integer positions [B, L] (NeoX half-split layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))  # [D/2]
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, D]
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin, full_precision: bool):
    """x: [B, L, H, D]; cos/sin: [B, L, D] f32.

    full_precision (LLaDA `rope_full_precision`): rotate in f32, cast back once. Otherwise (HF style, spec N3) the
    tables are cast to x's dtype and the rotation rounds per op.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if full_precision:
        x32 = x.astype(F32)
        return (x32 * cos + _rotate_half(x32) * sin).astype(x.dtype)
    c, s = cos.astype(x.dtype), sin.astype(x.dtype)
    return x * c + _rotate_half(x) * s


def dense(x, w, spec: str):
    """einsum with f32 accumulation, result in x's dtype (PyTorch's bf16 matmul accumulates in f32 and rounds once)."""
    return jnp.einsum(spec, x, w, preferred_element_type=F32).astype(x.dtype)


@jax.custom_vjp
def swiglu_mlp(x, w_gate, w_up, w_down):
    """down(silu(gate x) * up x); x: [B, L, D], w_gate/w_up: [D, I], w_down: [I, D].

    Custom VJP: the weight gradients contract over tokens with the D-wide operand transposed (x, dy) instead of the
    I-wide one (silu(g) * u, which XLA:CPU otherwise recomputes into a transposed [I, B*L] copy, ~15% of a layer's
    backward); silu(g) * u is rebuilt from the saved g and u; the gate and up gradients run as one matmul each
    against the weights stacked as [D, 2, I] (a new axis, so a sharded I axis stays sharded). The forward keeps two
    matmuls: decoding is weight-bandwidth bound and stacking would copy the weights on every call."""
    return _swiglu_fwd(x, w_gate, w_up, w_down)[0]


def _swiglu_fwd(x, w_gate, w_up, w_down):
    g = dense(x, w_gate, "bld,di->bli")
    u = dense(x, w_up, "bld,di->bli")
    return dense(jax.nn.silu(g) * u, w_down, "bli,id->bld"), (x, g, u, w_gate, w_up, w_down)


def _swiglu_bwd(res, dy):
    x, g, u, w_gate, w_up, w_down = res
    dt = x.dtype
    g32, u32 = g.astype(F32), u.astype(F32)
    sig = jax.nn.sigmoid(g32)
    silu = (g32 * sig).astype(dt)
    h = silu * u                                                         # as the forward rounds it
    dh = jnp.einsum("bld,id->bli", dy, w_down.astype(dt), preferred_element_type=F32)
    dw_down = jnp.einsum("bld,bli->di", dy, h, preferred_element_type=F32).T
    dgu = jnp.stack([dh * u32 * sig * (1.0 + g32 * (1.0 - sig)), dh * silu.astype(F32)], axis=2).astype(dt)
    w = jnp.stack([w_gate, w_up], axis=1).astype(dt)                     # [D, 2, I]
    dx = jnp.einsum("blci,dci->bld", dgu, w, preferred_element_type=F32).astype(dt)
    dw = jnp.einsum("bld,blci->dci", x, dgu, preferred_element_type=F32)
    return dx, dw[:, 0].astype(w_gate.dtype), dw[:, 1].astype(w_up.dtype), dw_down.astype(w_down.dtype)


swiglu_mlp.defvjp(_swiglu_fwd, _swiglu_bwd)


def attention(q, k, v, mask):
    """Grouped-query attention with a boolean mask.

    q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; mask: [B or 1, Lq, Lk] bool (True = may attend) or None (all).
    Query head h reads KV head h // (Hq / Hkv) (contiguous groups, spec §1.3). Scores and softmax in f32; the
    probabilities are cast to the compute dtype before the value product (as HF eager attention does).
    Query rows with no visible key return zeros, not NaN (torch >= 2.5 SDPA semantics, spec §8.1 / A5).
    Layout: head-major [B, Hkv, G*Lq, D] so both products are plain batched matmuls (no [Lq, Lk]-sized
    transposes; 2x faster on XLA:CPU than the grouped einsum, BUILD_NOTES "Forward benchmark").
    """
    lq, hkv = q.shape[1], k.shape[2]
    m = None if mask is None else mask[:, None, None]  # [B|1, 1, 1, Lq, Lk]
    o = _attention_core(_heads_major(q, hkv), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), m, lq)
    return _heads_back(o, lq)


def _heads_major(q, hkv: int):
    """[B, Lq, Hq, D] -> [B, Hkv, G*Lq, D]: each KV head's G query heads stacked along the query axis."""
    b, lq, hq, d = q.shape
    g = hq // hkv
    return q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)


def _heads_back(o, lq: int):
    """Inverse of `_heads_major`: [B, Hkv, G*Lq, D] -> [B, Lq, Hq, D]."""
    b, hkv, gq, d = o.shape
    g = gq // lq
    return o.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hkv * g, d)


def _scores(qh, kh, m, lq: int):
    """Masked f32 scores [B, Hkv, G, Lq, Lk] of head-major q [B, Hkv, G*Lq, D], k [B, Hkv, Lk, D]; m [B|1, 1, 1, Lq,
    Lk] or None (nothing masked)."""
    b, hkv, gq, d = qh.shape
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=F32).reshape(b, hkv, gq // lq, lq, kh.shape[2])
    return s * (d ** -0.5) if m is None else jnp.where(m, s * (d ** -0.5), -jnp.inf)


def _softmax(s, dtype):
    """Row softmax of masked f32 scores [..., Lk] cast to `dtype` (rows with no visible key: zeros), and the row
    log-sum-exp (+inf for those rows)."""
    mx = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(mx == -jnp.inf, 0.0, mx))  # masked keys: exp(-inf) = 0
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = (e / jnp.where(denom > 0, denom, 1.0)).astype(dtype)
    return p, jnp.where(denom > 0, mx + jnp.log(jnp.where(denom > 0, denom, 1.0)), jnp.inf)


def _attention_fwd(qh, kh, vh, m, lq):
    p, lse = _softmax(_scores(qh, kh, m, lq), qh.dtype)
    p = p.reshape(qh.shape[:3] + (kh.shape[2],))
    o = jnp.einsum("bhqk,bhkd->bhqd", p, vh, preferred_element_type=F32).astype(qh.dtype)
    return o, (qh, kh, vh, m, o, lse)


def attention_cache_and_new(q, kc, vc, mask_c, kn, vn, mask_n):
    """Attention over a KV cache and this call's keys without writing one into the other first (inference only).

    q: [B, Lq, Hq, D]; kc, vc: the cache [B, Hkv, Lmax, D] as it was before this call (read, never copied);
    kn, vn: this call's [B, Hkv, Lq, D]; mask_c [B|1, Lq, Lmax] (the slots this call overwrites must be hidden),
    mask_n [B|1, Lq, Lq]. One softmax over the Lmax + Lq keys (cache slots first), so it equals `attention` over the
    cache with this call's K/V written in, up to the order of the f32 sums."""
    lq, lmax = q.shape[1], kc.shape[2]
    qh = _heads_major(q, kc.shape[1])
    s = jnp.concatenate([_scores(qh, kc, mask_c[:, None, None], lq), _scores(qh, kn, mask_n[:, None, None], lq)], -1)
    p, _ = _softmax(s, q.dtype)
    p = p.reshape(qh.shape[:3] + (lmax + lq,))
    o = (jnp.einsum("bhqk,bhkd->bhqd", p[..., :lmax], vc, preferred_element_type=F32)
         + jnp.einsum("bhqk,bhkd->bhqd", p[..., lmax:], vn, preferred_element_type=F32)).astype(q.dtype)
    return _heads_back(o, lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(qh, kh, vh, m, lq):
    """softmax(q k^T / sqrt(D), masked) v in head-major layout. Custom VJP (flash-attention style backward): only q,
    k, v, o and the per-row log-sum-exp are kept for the backward pass, which recomputes the probabilities, instead
    of autodiff keeping several [B, H, Lq, Lk] f32 tensors per layer (the bulk of the train step's memory)."""
    return _attention_fwd(qh, kh, vh, m, lq)[0]


def _attention_bwd(lq, res, do):
    qh, kh, vh, m, o, lse = res
    dt = qh.dtype
    p = jnp.exp(_scores(qh, kh, m, lq) - lse).reshape(qh.shape[:3] + (kh.shape[2],))  # [B, Hkv, G*Lq, Lk] f32
    dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(dt), do, preferred_element_type=F32).astype(vh.dtype)
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, vh, preferred_element_type=F32)
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)  # = sum_k p dp (softmax backward)
    ds = (p * (dp - delta) * (qh.shape[-1] ** -0.5)).astype(dt)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh, preferred_element_type=F32).astype(dt)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qh, preferred_element_type=F32).astype(kh.dtype)
    return dq, dk, dv, None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q, k, v, mask, chunk: int):
    """`attention` for masks that hide every key at or beyond the end of each query chunk (causal, or block-causal
    with blocks dividing `chunk`, when queries and keys are the same positions): chunk i attends only to keys
    [0, (i+1) * chunk), skipping the hidden upper triangle. Same result as `attention` under that promise."""
    lq = q.shape[1]
    if chunk <= 0 or lq <= chunk or k.shape[1] != lq or mask is None:
        return attention(q, k, v, mask)
    outs = [attention(q[:, i:i + chunk], k[:, :i + chunk], v[:, :i + chunk], mask[:, i:i + chunk, :i + chunk])
            for i in range(0, lq, chunk)]
    return jnp.concatenate(outs, axis=1)
