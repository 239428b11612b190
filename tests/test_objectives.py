"""Training objectives vs NumPy/PyTorch re-statements written from the spec (trims_mdlm.md §3.3, §3.5, §4, §5).

The reference takes the same uniforms (the random source), then redoes everything else itself: times, masks, the
noised ids, logits from the `transformers` model holding the same weights with its own mask, CE in float64, the
weights and the normalisation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax.checkpoint import load_checkpoint
from dlmjax.train import noise
from dlmjax.train.config import ObjectiveConfig
from dlmjax.train.objective import add_noise
from dlmjax.train.objectives import make_objective as _make_objective


def make_objective(*args, **kw):
    """The objective's loss with the batch builder's noise drawn from `key` (as the loop does for one step)."""
    obj = _make_objective(*args, **kw)
    return lambda params, batch, key: obj.loss_fn(params, add_noise(batch, key))
from tests.reference import hf_models as R

B, L = 4, 16


def _batch(cfg, seed=0, with_bucket=False, K=8):
    rng = np.random.default_rng(seed)
    prompt_len = np.array([3, 5, 2, 6])
    length = np.array([12, 16, 9, 14])  # real tokens; the rest are trained EOS pads
    ids = rng.integers(0, cfg.vocab_size - 2, (B, L)).astype(np.int32)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    ar = np.arange(L)[None]
    ids = np.where(ar < length[:, None], ids, eos)
    maskable = ar >= prompt_len[:, None]
    batch = {"input_ids": ids, "maskable": maskable, "length": length.astype(np.int32),
             "row": np.arange(B, dtype=np.int32)}
    if with_bucket:
        bucket = rng.integers(1, K + 1, (B, L))
        bucket = np.where(ar < length[:, None], bucket, K)
        batch["bucket"] = np.where(maskable, bucket, 0).astype(np.int8)
    return batch


def _uniforms(key, n_scalars):
    s, u = noise.row_uniforms(key, jnp.arange(B), L, n_scalars)
    return np.asarray(s, np.float64), np.asarray(u, np.float64)


def _ce64(logits, ids):
    lp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    return -np.take_along_axis(lp, ids[..., None].astype(np.int64), -1)[..., 0]


def _norm(nll, maskable, mode):
    if mode == "token":
        return nll.sum() / max(maskable.sum(), 1)
    if mode == "sequence":
        return np.mean(nll.sum(-1) / np.maximum(maskable.sum(-1), 1))
    return nll.sum() / nll.shape[0]


def _ours(ckpt, oc, batch, key, **over):
    cfg, params = load_checkpoint(ckpt, **over)
    fn = jax.jit(make_objective(cfg, oc, B))
    loss, sums = fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    return cfg, float(loss), {k: float(v) for k, v in sums.items()}


def _cart_ref(masked, p):
    out = np.zeros(masked.shape)
    for b in range(masked.shape[0]):
        for i in range(masked.shape[1]):
            if masked[b, i]:
                out[b, i] = sum(0.5 * p * (1 - p) ** (abs(i - j) - 1)
                                for j in range(masked.shape[1]) if j != i and not masked[b, j])
    return out


@pytest.mark.parametrize("norm", ["token", "sequence", "batch"])
@pytest.mark.parametrize("schedule,weight", [("linear", "scheduler"), ("cosine", "scheduler"), ("linear", "uniform")])
def test_mdlm_llada_matches_reference(imported, norm, schedule, weight):
    model, ckpt, _, _ = imported("llada")
    cfg, _ = load_checkpoint(ckpt)
    batch = _batch(cfg)
    key = jax.random.key(3)
    oc = ObjectiveConfig(norm=norm, schedule=schedule, weight=weight)
    _, loss, sums = _ours(ckpt, oc, batch, key)

    s, u = _uniforms(key, 3)
    t = 1e-3 + (1 - 1e-3) * s[:, 0]
    p = t if schedule == "linear" else np.cos(math.pi / 2 * (1 - t))
    masked = (u < p[:, None]) & batch["maskable"]
    x_t = np.where(masked, cfg.mask_token_id, batch["input_ids"])
    logits = R.hf_logits(model, x_t, np.ones((B, L, L), bool))  # LLaDA: no attention mask, pads visible
    ce = _ce64(logits, batch["input_ids"])
    if weight == "uniform":
        w = np.ones(B)
    elif schedule == "linear":
        w = 1 / (t + 1e-6)
    else:
        w = (math.pi / 2 * np.sin(math.pi / 2 * (1 - t))) / (np.cos(math.pi / 2 * (1 - t)) + 1e-6)
    ref = _norm(ce * w[:, None] * masked, batch["maskable"], norm)
    assert masked.sum() > 5 and (~batch["maskable"] & masked).sum() == 0
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    assert sums["n_masked"] == masked.sum()
    np.testing.assert_allclose(sums["ce_masked"], (ce * masked).sum(), rtol=2e-5)
    assert sums["n_correct"] == ((logits.argmax(-1) == batch["input_ids"]) & masked).sum()


def test_mdlm_dream_shift_and_cart(imported):
    model, ckpt, _, _ = imported("dream")
    cfg, _ = load_checkpoint(ckpt)
    batch = _batch(cfg, seed=1)
    key = jax.random.key(5)
    oc = ObjectiveConfig(weight="cart", cart_p=0.3)
    _, loss, _ = _ours(ckpt, oc, batch, key)

    s, u = _uniforms(key, 3)
    t = 1e-3 + (1 - 1e-3) * s[:, 0]
    masked = (u < t[:, None]) & batch["maskable"]
    x_t = np.where(masked, cfg.mask_token_id, batch["input_ids"])
    valid = np.arange(L)[None] < batch["length"][:, None]
    allowed = np.broadcast_to(valid[:, None, :], (B, L, L))  # dLLM's Dream collator keeps the mask: pads hidden as keys
    logits = R.hf_logits(model, x_t, allowed)
    logits = np.concatenate([logits[:, :1], logits[:, :-1]], 1)  # logits at i-1 predict token i
    ce = _ce64(logits, batch["input_ids"])
    w = _cart_ref(masked, 0.3)
    ref = _norm(ce * w * masked, batch["maskable"], "token")
    np.testing.assert_allclose(loss, ref, rtol=2e-5)


def test_cart_weight_matches_loop():
    rng = np.random.default_rng(0)
    masked = rng.random((3, 11)) < 0.5
    np.testing.assert_allclose(np.asarray(noise.cart_weight(jnp.asarray(masked), 0.3)), _cart_ref(masked, 0.3),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k_range,tw", [("zero", "inv_p"), ("one", "t_eff"), ("zero", "uniform")])
def test_trims_matches_reference(imported, k_range, tw):
    model, ckpt, _, _ = imported("llada")
    cfg, _ = load_checkpoint(ckpt)
    K = 8
    batch = _batch(cfg, seed=2, with_bucket=True, K=K)
    key = jax.random.key(11)
    oc = ObjectiveConfig(kind="trims", rho=0.5, k_range=k_range, trims_weight=tw, num_buckets=K)
    _, loss, sums = _ours(ckpt, oc, batch, key)

    s, u = _uniforms(key, 3)
    t = 1e-3 + (1 - 1e-3) * s[:, 0]
    traj = s[:, 1] < 0.5
    k = (0 if k_range == "zero" else 1) + np.minimum(np.floor(s[:, 2] * K), K - 1).astype(int)
    p = np.zeros((B, L))
    w = np.zeros((B, L))
    for b in range(B):
        for i in range(L):
            if not batch["maskable"][b, i]:
                continue  # the prompt is never masked
            if traj[b]:
                p[b, i] = 0.95 if batch["bucket"][b, i] > k[b] else 0.05  # future (easier) vs context
            else:
                p[b, i] = t[b]
    for b in range(B):
        if traj[b]:
            if tw == "inv_p":
                w[b] = np.where(p[b] > 0, 1 / np.maximum(p[b], 1e-6), 1e6)
            elif tw == "uniform":
                w[b] = 1.0
            else:
                w[b] = 1 / (p[b].sum() / batch["maskable"][b].sum())
        else:
            w[b] = 1 / (t[b] + 1e-6)
    masked = u < p
    assert 0 < traj.sum() < B  # both branches exercised
    x_t = np.where(masked, cfg.mask_token_id, batch["input_ids"])
    ce = _ce64(R.hf_logits(model, x_t, np.ones((B, L, L), bool)), batch["input_ids"])
    ref = _norm(ce * w * masked, batch["maskable"], "token")
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    assert sums["n_traj_rows"] == traj.sum()


def _bd3_allowed_ref(n, blk):
    """BD3-LM mask written from the spec's three conditions, element by element."""
    a = np.zeros((2 * n, 2 * n), bool)
    for q in range(2 * n):
        for k in range(2 * n):
            qc, kc = q >= n, k >= n
            qb, kb = (q % n) // blk, (k % n) // blk
            a[q, k] = (qb == kb and qc == kc) or (not qc and kc and qb > kb) or (qc and kc and qb >= kb)
    return a


@pytest.mark.parametrize("block_noise", ["sequence", "block"])
def test_bd3lm_matches_reference(imported, block_noise):
    model, ckpt, _, _ = imported("sdar")
    cfg, _ = load_checkpoint(ckpt)
    blk = 4
    batch = _batch(cfg, seed=3)
    key = jax.random.key(7)
    oc = ObjectiveConfig(kind="bd3lm", block_size=blk, block_noise=block_noise)
    _, loss, _ = _ours(ckpt, oc, batch, key)

    nb = L // blk
    s, u = _uniforms(key, nb)
    if block_noise == "block":
        t_tok = np.repeat(1e-3 + (1 - 1e-3) * s[:, :nb], blk, axis=1)
    else:
        t_tok = np.repeat((1e-3 + (1 - 1e-3) * s[:, :1]), L, axis=1)
    masked = (u < t_tok) & batch["maskable"]
    x_t = np.where(masked, cfg.mask_token_id, batch["input_ids"])
    tokens = np.concatenate([x_t, batch["input_ids"]], 1)
    pos = np.broadcast_to(np.concatenate([np.arange(L), np.arange(L)]), (B, 2 * L))
    allowed = np.broadcast_to(_bd3_allowed_ref(L, blk), (B, 2 * L, 2 * L))
    np.testing.assert_array_equal(noise.bd3lm_attention_mask(L, blk), allowed[0])
    logits = R.hf_logits(model, tokens, allowed, position_ids=pos)[:, :L]
    ce = _ce64(logits, batch["input_ids"])
    ref = _norm(ce * (1 / (t_tok + 1e-6)) * masked, batch["maskable"], "token")
    np.testing.assert_allclose(loss, ref, rtol=2e-5)


def test_chunked_ce_equals_full_with_grads(imported):
    _, ckpt, _, _ = imported("llada")
    cfg, params = load_checkpoint(ckpt)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items()}
    key = jax.random.key(0)
    full = make_objective(cfg, ObjectiveConfig(head_rows=0), B)
    chunk = make_objective(cfg, ObjectiveConfig(ce_chunk=4, head_rows=0), B)
    (l1, _), g1 = jax.value_and_grad(full, has_aux=True)(params, batch, key)
    (l2, _), g2 = jax.value_and_grad(chunk, has_aux=True)(params, batch, key)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family,kind", [("llada", "mdlm"), ("dream", "mdlm"), ("sdar", "bd3lm")])
def test_masked_only_head_equals_dense_head_with_grads(family, kind, imported):
    """head_rows > 0 (the head only at masked positions, chunks without any skipped) == the dense head: loss, every
    metric and every gradient; 5-row chunks leave a padded last chunk and skip the chunks past the masked ones."""
    _, ckpt, _, _ = imported(family)
    cfg, params = load_checkpoint(ckpt)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items()}
    extra = {"block_size": 4} if kind == "bd3lm" else {}
    dense = make_objective(cfg, ObjectiveConfig(kind=kind, head_rows=0, **extra), B)
    sparse = make_objective(cfg, ObjectiveConfig(kind=kind, head_rows=5, **extra), B)
    for seed in (0, 1):
        key = jax.random.key(seed)
        (l1, s1), g1 = jax.value_and_grad(dense, has_aux=True)(params, batch, key)
        (l2, s2), g2 = jax.value_and_grad(sparse, has_aux=True)(params, batch, key)
        n_masked = int(s1["n_masked"])
        assert 5 <= n_masked <= B * L - 10                 # some chunks are really skipped
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
        for k in s1:
            np.testing.assert_allclose(float(s1[k]), float(s2[k]), rtol=1e-6, err_msg=k)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    nothing = dict(batch, maskable=jnp.zeros_like(batch["maskable"]))       # no masked position at all
    (l3, s3), g3 = jax.value_and_grad(sparse, has_aux=True)(params, nothing, jax.random.key(0))
    assert float(l3) == 0.0 and float(s3["n_masked"]) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g3))


def test_antithetic_times_are_stratified():
    rows = jnp.arange(16)
    t = np.asarray(noise.sample_times(None, 0.0, True, rows, 16, jnp.float32(0.37)))
    frac = np.sort(t)
    np.testing.assert_allclose(np.diff(frac), 1 / 16, atol=1e-6)


def test_trims_mask_unit_properties():
    """Spec §5.5 unit tests: k=0 masks every response token with p_high; k=K-1 only bucket K; prompt never masked;
    E[m * w] = 1 per response token with inv_p weights (Monte Carlo)."""
    K, n = 8, 24
    bucket = jnp.asarray(np.tile(np.r_[np.zeros(4), np.repeat(np.arange(1, K + 1), 2), np.full(4, K)], (1, 1)),
                         jnp.int8)
    maskable = bucket > 0
    ones = jnp.ones((1,))
    for k, expect_high in ((0, bucket > 0), (K - 1, bucket == K)):
        u_k = jnp.full((1,), (k + 0.5) / K)
        _, p, traj, kk = noise.trims_mask(jnp.zeros(1), u_k, 0.5 * ones, jnp.zeros((1, n)), maskable, bucket,
                                          num_buckets=K, p_high=0.95, p_low=0.05, rho=0.5, k_range="zero")
        assert int(kk[0]) == k and bool(traj[0])
        p = np.asarray(p)
        np.testing.assert_allclose(p[np.asarray(expect_high)], 0.95)
        np.testing.assert_allclose(p[np.asarray(maskable & ~expect_high)], 0.05)
        assert (p[~np.asarray(maskable)] == 0).all()
    # Monte Carlo: E[m / p] over trajectory draws = 1 on every response token.
    key = jax.random.key(0)
    draws = 20000
    ks = jax.random.split(key, 3)
    u_sel = jnp.zeros(draws)
    u_k = jax.random.uniform(ks[0], (draws,))
    u_tok = jax.random.uniform(ks[1], (draws, n))
    bb = jnp.broadcast_to(bucket, (draws, n))
    mm = jnp.broadcast_to(maskable, (draws, n))
    m, p, _, _ = noise.trims_mask(u_sel, u_k, jnp.full(draws, 0.5), u_tok, mm, bb, num_buckets=K, p_high=0.95,
                                  p_low=0.05, rho=1.0, k_range="zero")
    est = np.asarray(jnp.where(m, 1 / jnp.maximum(p, 1e-6), 0.0).mean(0))
    np.testing.assert_allclose(est[np.asarray(maskable[0])], 1.0, atol=0.08)
    assert (est[~np.asarray(maskable[0])] == 0).all()


def test_objective_rejects_wrong_attention(imported):
    _, ckpt, _, _ = imported("sdar")
    cfg, _ = load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="bidirectional"):
        make_objective(cfg, ObjectiveConfig(kind="mdlm"), B)
    with pytest.raises(ValueError, match="objective=.nope."):
        ObjectiveConfig(kind="nope")
