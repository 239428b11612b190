"""Layer-level checks against plain NumPy re-statements (GQA grouping, arbitrary masks, RoPE half-split, RMSNorm)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dlmjax.model.layers import apply_rope, attention, rms_norm, rope_tables


def np_attention(q, k, v, mask):
    b, lq, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kh = h // g  # contiguous groups (spec §1.3)
            s = q[bi, :, h] @ k[bi, :, kh].T / np.sqrt(d)
            for i in range(lq):
                m = mask[bi, i]
                if not m.any():
                    continue  # fully masked row -> zeros
                e = np.exp(s[i][m] - s[i][m].max())
                out[bi, i, h] = (e / e.sum()) @ v[bi, m, kh]
    return out


def test_attention_gqa_arbitrary_mask_and_empty_rows():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
    mask = rng.random((2, 5, 7)) < 0.5
    mask[0, 2] = False  # a query that sees nothing
    mask[1, 4] = False
    ours = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    ref = np_attention(q, k, v, mask)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours[0, 2] == 0).all() and (ours[1, 4] == 0).all() and np.isfinite(ours).all()


def test_rope_half_split_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
    pos = np.array([[0, 3, 17, 1000]])
    cos, sin = rope_tables(jnp.asarray(pos), 8, 10000.0)
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin, full_precision=False))
    inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
    ref = np.zeros_like(x)
    for t in range(4):
        for j in range(4):  # pairs (j, j + d/2) rotate by angle pos * inv[j]
            a = pos[0, t] * inv[j]
            x1, x2 = x[0, t, :, j], x[0, t, :, j + 4]
            ref[0, t, :, j] = x1 * np.cos(a) - x2 * np.sin(a)
            ref[0, t, :, j + 4] = x2 * np.cos(a) + x1 * np.sin(a)
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_rope_full_precision_rounds_once():
    """bf16 input: full precision rotates in f32 and rounds once; the HF path rounds tables and each op."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 64, 1, 16)).astype(np.float32)
    pos = jnp.arange(64)[None] * 37
    cos, sin = rope_tables(pos, 16, 10000.0)
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    full = np.asarray(apply_rope(xb, cos, sin, True).astype(jnp.float32))
    exact = np.asarray(apply_rope(jnp.asarray(xb.astype(jnp.float32)), cos, sin, False))
    np.testing.assert_array_equal(full, exact.astype(ml_dtypes.bfloat16).astype(np.float32))
    hf = np.asarray(apply_rope(xb, cos, sin, False).astype(jnp.float32))
    assert np.abs(hf - exact).max() > np.abs(full - exact).max()


def test_rms_norm_rounding_styles():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 32)).astype(np.float32)
    w = (1 + 0.1 * rng.normal(size=32)).astype(np.float32)
    xb, wb = x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16)
    x32 = xb.astype(np.float32)
    y = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6)
    two = wb.astype(np.float32) * y.astype(ml_dtypes.bfloat16).astype(np.float32)
    ref_two = two.astype(ml_dtypes.bfloat16).astype(np.float32)
    ref_one = (y * wb.astype(np.float32)).astype(ml_dtypes.bfloat16).astype(np.float32)
    o2 = np.asarray(rms_norm(jnp.asarray(xb), jnp.asarray(wb), 1e-6, False).astype(jnp.float32))
    o1 = np.asarray(rms_norm(jnp.asarray(xb), jnp.asarray(wb), 1e-6, True).astype(jnp.float32))
    np.testing.assert_array_equal(o2, ref_two)
    np.testing.assert_array_equal(o1, ref_one)
    assert (o1 != o2).any()  # the two styles really differ in bf16 (spec N2)


def test_chunked_attention_equals_full_under_causal_and_block_masks():
    from dlmjax.model.layers import chunked_attention

    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(2, 24, 4, 8)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, 24, 2, 8)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, 24, 2, 8)).astype(np.float32))
    i = np.arange(24)
    causal = np.tril(np.ones((24, 24), bool))[None] & (rng.random((2, 1, 24)) < 0.8)
    block = ((i[None, :] // 4) <= (i[:, None] // 4))[None]  # blocks of 4 divide the chunk of 8
    for m in (causal, block):
        full = np.asarray(attention(q, k, v, jnp.asarray(m)))
        np.testing.assert_allclose(np.asarray(chunked_attention(q, k, v, jnp.asarray(m), 8)), full, atol=1e-6)
    # the promise matters: a bidirectional mask is not causal, and chunking then gives a different result
    bi = np.ones((1, 24, 24), bool)
    assert np.abs(np.asarray(chunked_attention(q, k, v, jnp.asarray(bi), 8)) -
                  np.asarray(attention(q, k, v, jnp.asarray(bi)))).max() > 1e-3
