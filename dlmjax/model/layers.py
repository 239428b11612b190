"""Building blocks of the transformer: RMSNorm, RoPE, SwiGLU MLP and grouped-query attention.

Numerics mirror the reference PyTorch code (spec models_decoders.md §1.5); each choice is listed in BUILD_NOTES.md.
"""

from __future__ import annotations

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


def swiglu_mlp(x, w_gate, w_up, w_down):
    """down(silu(gate x) * up x); x: [B, L, D], w_gate/w_up: [D, I], w_down: [I, D]."""
    g = dense(x, w_gate, "bld,di->bli")
    u = dense(x, w_up, "bld,di->bli")
    return dense(jax.nn.silu(g) * u, w_down, "bli,id->bld")


def attention(q, k, v, mask):
    """Grouped-query attention with a boolean mask.

    q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; mask: [B or 1, Lq, Lk] bool (True = may attend).
    Query head h reads KV head h // (Hq / Hkv) (contiguous groups, spec §1.3). Scores and softmax in f32; the
    probabilities are cast to the compute dtype before the value product (as HF eager attention does).
    Query rows with no visible key return zeros, not NaN (torch >= 2.5 SDPA semantics, spec §8.1 / A5).
    Layout: head-major [B, Hkv, G*Lq, D] so both products are plain batched matmuls (no [Lq, Lk]-sized
    transposes; 2x faster on XLA:CPU than the grouped einsum, BUILD_NOTES "Forward benchmark").
    """
    b, lq, hq, d = q.shape
    hkv, lk = k.shape[2], k.shape[1]
    g = hq // hkv
    qh = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=F32).reshape(b, hkv, g, lq, lk) * (d ** -0.5)
    m = mask[:, None, None]
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(mx == -jnp.inf, 0.0, mx))  # masked keys: exp(-inf) = 0
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = (e / jnp.where(denom > 0, denom, 1.0)).astype(q.dtype).reshape(b, hkv, g * lq, lk)
    o = jnp.einsum("bhqk,bhkd->bhqd", p, vh, preferred_element_type=F32).astype(q.dtype)
    return o.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)


def chunked_attention(q, k, v, mask, chunk: int):
    """`attention` for masks that hide every key at or beyond the end of each query chunk (causal, or block-causal
    with blocks dividing `chunk`, when queries and keys are the same positions): chunk i attends only to keys
    [0, (i+1) * chunk), skipping the hidden upper triangle. Same result as `attention` under that promise."""
    lq = q.shape[1]
    if chunk <= 0 or lq <= chunk or k.shape[1] != lq:
        return attention(q, k, v, mask)
    outs = [attention(q[:, i:i + chunk], k[:, :i + chunk], v[:, :i + chunk], mask[:, i:i + chunk, :i + chunk])
            for i in range(0, lq, chunk)]
    return jnp.concatenate(outs, axis=1)
