"""KV cache (block-causal prefill + block steps), scan over layers vs an unrolled loop, remat on/off gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.model import transformer as T
from dlmjax.model.layers import rope_tables

CFG = ModelConfig(family="sdar", vocab_size=80, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, qk_norm=True,
                  attention="block_causal", block_size=4)
BS = CFG.block_size


@pytest.fixture(scope="module")
def params():
    return M.init_params(CFG, jax.random.key(0), std=0.2)


def _full(params, tokens):
    b, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n), (b, n))
    return np.asarray(M.forward(CFG, params, tokens, pos, M.block_causal_mask(pos, pos, BS)))


def test_cached_block_decoding_equals_uncached(params):
    """Prefill 3 blocks, run a read-only step on block 4, write it, then block 5: logits equal the uncached ones."""
    b, lmax = 2, 32
    tokens = jax.random.randint(jax.random.key(1), (b, 20), 0, CFG.vocab_size)
    full = _full(params, tokens)
    slots = jnp.broadcast_to(jnp.arange(lmax), (b, lmax))
    pos = jnp.broadcast_to(jnp.arange(20), (b, 20))
    cache = M.init_cache(CFG, b, lmax)

    def run(cache, start, stop):
        p = pos[:, start:stop]
        return M.forward(CFG, params, tokens[:, start:stop], p, M.block_causal_mask(p, slots, BS), cache, start)

    l_pre, cache = run(cache, 0, 12)
    np.testing.assert_allclose(np.asarray(l_pre), full[:, :12], atol=1e-5, rtol=1e-5)
    l_ro, _ = run(cache, 12, 16)  # read-only denoising step: the returned cache is dropped
    np.testing.assert_allclose(np.asarray(l_ro), full[:, 12:16], atol=1e-5, rtol=1e-5)
    assert not bool(cache["valid"][:, 12:].any())
    _, cache = run(cache, 12, 16)  # the extra forward that writes the finished block
    l5, cache = run(cache, 16, 20)
    np.testing.assert_allclose(np.asarray(l5), full[:, 16:20], atol=1e-5, rtol=1e-5)
    assert bool(cache["valid"][:, :20].all()) and not bool(cache["valid"][:, 20:].any())


def test_cache_per_row_write_index(params):
    """Rows at different offsets (one write index per row) match each row's own uncached forward."""
    lmax = 24
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, CFG.vocab_size)
    full = _full(params, tokens)
    starts = jnp.array([4, 8])
    cache = M.init_cache(CFG, 2, lmax)
    slots = jnp.broadcast_to(jnp.arange(lmax), (2, lmax))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    # prefill each row's own prefix (rows padded to 8 tokens; only the first `start` slots are kept valid)
    m = M.block_causal_mask(pos[:, :8], slots, BS)
    _, cache = M.forward(CFG, params, tokens[:, :8], pos[:, :8], m, cache, 0)
    cache["valid"] = slots < starts[:, None]
    idx = starts[:, None] + jnp.arange(4)
    blk_tok = jnp.take_along_axis(tokens, idx, axis=1)
    logits, cache2 = M.forward(CFG, params, blk_tok, idx, M.block_causal_mask(idx, slots, BS), cache, starts)
    for r in range(2):
        s = int(starts[r])
        np.testing.assert_allclose(np.asarray(logits[r]), full[r, s:s + 4], atol=1e-5, rtol=1e-5)
        assert bool(cache2["valid"][r, :s + 4].all()) and not bool(cache2["valid"][r, s + 4:].any())


def test_cache_never_reads_unwritten_slots(params):
    """Garbage in unwritten cache slots does not change the result (validity mask)."""
    b, lmax = 1, 16
    tokens = jax.random.randint(jax.random.key(3), (b, 8), 0, CFG.vocab_size)
    slots = jnp.broadcast_to(jnp.arange(lmax), (b, lmax))
    pos = jnp.broadcast_to(jnp.arange(8), (b, 8))
    clean = M.init_cache(CFG, b, lmax)
    dirty = {**clean, "k": clean["k"] + 7.0, "v": clean["v"] - 3.0}
    mask = jnp.ones((b, 8, lmax), bool)  # even an all-true mask cannot see unwritten slots
    a, _ = M.forward(CFG, params, tokens, pos, mask, clean, 0)
    d, _ = M.forward(CFG, params, tokens, pos, mask, dirty, 0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


def _unrolled(cfg, params, tokens, pos, mask):
    """The same layers driven by a Python loop (no scan): checks the stacking/scan plumbing."""
    h = jnp.take(params["embed"], tokens, axis=0)
    cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta)
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda w: w[i], params["layers"])
        h, _ = T._layer(cfg, h, lp, cos, sin, mask, None, None, None)
    h = T.rms_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.family == "sdar")
    return M.lm_head(cfg, params, h)


def test_scan_equals_unrolled(params):
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    mask = M.block_causal_mask(pos, pos, BS)
    np.testing.assert_allclose(np.asarray(M.forward(CFG, params, tokens, pos, mask)),
                               np.asarray(_unrolled(CFG, params, tokens, pos, mask)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_same_grads(params, policy):
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    mask = M.block_causal_mask(pos, pos, BS)

    def loss(p, cfg):
        lg = M.forward(cfg, p, tokens, pos, mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[..., None], -1))

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, CFG)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, CFG.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 0


def test_f32_master_bf16_compute(params):
    """f32 params with bf16 compute: logits come out bf16 and stay close to the f32 forward."""
    tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, CFG.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = M.block_causal_mask(pos, pos, BS)
    lo = M.forward(CFG.replace(compute_dtype="bfloat16"), params, tokens, pos, mask)
    hi = M.forward(CFG, params, tokens, pos, mask)
    assert lo.dtype == jnp.bfloat16 and params["embed"].dtype == jnp.float32
    err = float(jnp.abs(lo.astype(jnp.float32) - hi).max())
    assert 0 < err < 0.05 * float(jnp.abs(hi).max())
