"""Samplers and confidences (dlmjax.decode.sampling) against the NumPy re-statements in tests/reference/np_rules.py."""
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dlmjax.decode import sampling as S
from tests.reference import np_rules as NP

BF16 = np.dtype(ml_dtypes.bfloat16)
R, V = 64, 97


def random_logits(seed: int, dtype=np.float32, ties: bool = True):
    """Rows of varied sharpness, a third of them (when `ties`) with heavy exact ties (small integer logits)."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.5, 2.0, 5.0], size=(R, 1))
    x = rng.normal(size=(R, V)) * scale
    ints = rng.integers(-3, 3, size=(R, V)).astype(np.float64)
    x = np.where(rng.random((R, 1)) < (0.33 if ties else 0.0), ints, x)
    return x.astype(np.float32).astype(dtype)


def _ulp_close(got, want, dt, max_ulps=1, min_exact=0.99):
    """Half-type results: every value within `max_ulps` ulps, and almost all bit-equal."""
    g, w = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    nan = np.isnan(w)
    assert np.array_equal(np.isnan(g), nan)                              # fp16 entropy: NaN where torch's is NaN
    g, w = g[~nan], w[~nan]
    spacing = np.abs(np.asarray(np.spacing(np.abs(w.astype(dt)))).astype(np.float64))
    assert np.all(np.abs(g - w) <= max_ulps * spacing + 1e-45), np.max(np.abs(g - w) / spacing)
    assert np.mean(g == w) >= min_exact


# ----------------------------------------------------------------------------------------------------------------------
# truncation

@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=str)
def test_top_k_keep_matches_numpy(dtype):
    for k in (1, 5, V + 3, 0):
        x = random_logits(k, dtype)
        got = np.asarray(jax.jit(partial(S.top_k_keep, k=k))(jnp.asarray(x)))
        np.testing.assert_array_equal(got, NP.top_k_keep(x, k))
    assert np.asarray(S.top_k_keep(jnp.asarray([[1.0, 3.0, 3.0, 2.0]]), 2)).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=str)
def test_top_p_keep_matches_sorting_reference(dtype):
    """Bisection vs the reference's sort + cumsum + shifted removal. Rows whose decision flips when the cumulative
    sums move by 2e-6 (summation order) are excluded and counted."""
    f = jax.jit(S.top_p_keep)                                            # top_p traced: one compilation
    edge_rows = 0
    for seed, top_p in [(100, 0.3), (101, 0.9), (102, 0.95), (103, 0.95)]:
        x = random_logits(seed, dtype)
        got = np.asarray(f(jnp.asarray(x), top_p))
        want = NP.top_p_keep(x, top_p, dtype)
        edge = ((NP.top_p_keep(x, top_p, dtype, eps=2e-6) != want)
                | (NP.top_p_keep(x, top_p, dtype, eps=-2e-6) != want)).any(1)
        edge_rows += int(edge.sum())
        np.testing.assert_array_equal(got[~edge], want[~edge])
        assert got[np.arange(R), np.argmax(np.asarray(x, np.float64), 1)].all()      # the top token always stays
    assert edge_rows <= 0.05 * 4 * R


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=str)
def test_top_p_candidate_fast_path(dtype):
    """The top-C fast path (C = 12 here) decides sharp rows itself and falls back to the bisection when a nucleus is
    wider than C; both give the sorting reference's answer (edge rows as above)."""
    f = jax.jit(partial(S.top_p_keep, candidates=12))
    for seed, top_p, sharp in [(200, 0.3, 5.0), (201, 0.9, 5.0), (202, 0.9, 0.5)]:
        x = (random_logits(seed, np.float32, ties=False).astype(np.float64) * sharp).astype(np.float32).astype(dtype)
        got = np.asarray(f(jnp.asarray(x), top_p))
        want = NP.top_p_keep(x, top_p, dtype)
        edge = ((NP.top_p_keep(x, top_p, dtype, eps=2e-6) != want)
                | (NP.top_p_keep(x, top_p, dtype, eps=-2e-6) != want)).any(1)
        np.testing.assert_array_equal(got[~edge], want[~edge])
        assert edge.sum() <= 0.05 * R
    # sharp rows: every nucleus ends inside the 12 candidates, so the fast path alone decided (no fallback)
    x = jnp.asarray(random_logits(203, np.float32, ties=False) * 8.0)
    keep = np.asarray(f(x, 0.5))
    assert keep.sum(1).max() < 12
    ties = jnp.asarray([[0.0] * 4 + [-jnp.inf] * 20], jnp.float32)           # equal logits: lower index kept first
    assert np.asarray(jax.jit(partial(S.top_p_keep, candidates=6))(ties, 0.3))[0, :4].tolist() == [True, True,
                                                                                                    False, False]


def test_top_p_row_chunks_mix_fast_and_bisection():
    """Rows go to the bisection in chunks (5 rows here, the last one padded); a chunk of sharp rows keeps the fast
    path's answer, a chunk with a wide row is bisected: every row still equals the sorting reference."""
    x = random_logits(204, np.float32, ties=False) * np.where(np.arange(R) % 13 == 0, 0.3, 8.0)[:, None]
    x = x.astype(np.float32)
    want = NP.top_p_keep(x, 0.9, np.float32)
    edge = ((NP.top_p_keep(x, 0.9, np.float32, eps=2e-6) != want)
            | (NP.top_p_keep(x, 0.9, np.float32, eps=-2e-6) != want)).any(1)
    for cb in (5 * V * 4, 1):                                              # 5-row chunks; one row per chunk
        got = np.asarray(jax.jit(partial(S.top_p_keep, candidates=12, chunk_bytes=cb))(jnp.asarray(x), 0.9))
        np.testing.assert_array_equal(got[~edge], want[~edge])
    assert edge.sum() <= 2 and want[np.arange(R) % 13 == 0].sum(1).min() > 12   # wide rows really fall back


def test_top_p_ties_resolved_by_index():
    f = jax.jit(S.top_p_keep)                                            # top_p traced: one compilation
    x = jnp.asarray([[0.0] * 4 + [-jnp.inf] * 2, [0.0, 5.0, 0.0, 0.0, 5.0, -jnp.inf]], jnp.float32)
    # row 0: p = 0.25 each: cum .25 .5 .75 1, removal shifted right
    assert np.asarray(f(x, 0.5))[0].tolist() == [True, True, True, False, False, False]   # .5 is not > .5
    assert np.asarray(f(x, 0.3))[0].tolist() == [True, True, False, False, False, False]
    assert np.asarray(f(x, 1.0)).all() and np.asarray(S.top_p_keep(x, None)).all()
    for tp in (0.3, 0.4, 0.5):
        np.testing.assert_array_equal(f(x, tp), NP.top_p_keep(np.asarray(x), tp, np.float32))
    # per-row top_p
    np.testing.assert_array_equal(f(x, jnp.asarray([0.5, 0.4])),
                                  np.stack([NP.top_p_keep(np.asarray(x), 0.5, np.float32)[0],
                                            NP.top_p_keep(np.asarray(x), 0.4, np.float32)[1]]))


@pytest.mark.parametrize("top_p_first", [True, False])
def test_filter_order(top_p_first):
    """Dream: top-p then top-k; SDAR/jetengine: top-k then top-p (the second sees the renormalised survivors).
    No tied rows here: a sum of equal probabilities landing exactly on top_p depends on summation order."""
    x = random_logits(7, ties=False)
    f = jax.jit(partial(S.filter_logits, temperature=0.7, top_k=5, top_p=0.6, top_p_first=top_p_first))
    got = np.asarray(f(jnp.asarray(x)))
    y = (x * (np.float32(1) / np.float32(0.7))).astype(np.float32)      # torch CUDA: times the f32 reciprocal
    for step in (("p", "k") if top_p_first else ("k", "p")):
        keep = NP.top_p_keep(y, 0.6, np.float32) if step == "p" else NP.top_k_keep(y, 5)
        y = np.where(keep, y, -np.inf).astype(np.float32)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(y))
    np.testing.assert_allclose(got[np.isfinite(got)], y[np.isfinite(y)], rtol=1e-6)


def test_temperature_rounds_to_logit_dtype():
    x = jnp.asarray(random_logits(8, BF16))
    got = S.apply_temperature(x, 0.3)
    assert got.dtype == jnp.bfloat16
    want = (np.asarray(x).astype(np.float32) * (np.float32(1) / np.float32(0.3))).astype(BF16)
    np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want.astype(np.float32))
    assert S.apply_temperature(x, 1.0) is x and S.apply_temperature(x, 0.0) is x


# ----------------------------------------------------------------------------------------------------------------------
# token choice

def test_greedy_first_index_and_forbid_flag():
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert np.asarray(S.greedy(x)).tolist() == [1, 0]
    assert np.asarray(S.greedy(S.forbid_token(x, 1))).tolist() == [2, 0]
    z = S.filter_logits(x, forbid=3)
    assert np.isneginf(np.asarray(z)[:, 3]).all() and np.isfinite(np.asarray(z)[:, :3]).all()


def test_sample_categorical_replay_and_distribution():
    x = random_logits(9)
    g = np.random.default_rng(1).gumbel(size=(R, V)).astype(np.float32)
    np.testing.assert_array_equal(S.sample_categorical(jnp.asarray(x), gumbel=g), np.argmax(x + g, -1))
    toks = np.arange(R) % V
    np.testing.assert_array_equal(S.sample_categorical(jnp.asarray(x), tokens=toks), toks)
    with pytest.raises(ValueError):
        S.sample_categorical(jnp.asarray(x))
    logits = jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4]))
    draw = jax.jit(jax.vmap(lambda kk: S.sample_categorical(logits, key=kk)))
    draws = draw(jax.random.split(jax.random.key(0), 20000))
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 20000, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    # the mask-token flag: a forbidden token is never drawn, however large its logit
    big = jnp.asarray([[0.0, 30.0, 0.0]])
    assert int(S.sample_categorical(S.forbid_token(big, 1), key=jax.random.key(3))[0]) != 1


def test_sample_categorical_inverse_cdf_over_blocks():
    """The keyed sampler is a two-level inverse CDF (256-slot blocks): replayed uniforms pick the same index as a
    float64 NumPy inverse CDF (searchsorted), zero-probability slots (-inf holes, a whole empty block, the padding
    past V) are never picked even at u -> 1, and keyed draws follow p over a vocabulary of several blocks."""
    rng = np.random.default_rng(11)
    v = 700                                                              # 3 blocks, the last one padded
    x = (rng.normal(size=(6, v)) * 2).astype(np.float32)
    x[:, 100:300] = -np.inf                                              # holes across a block boundary
    x[1] = -np.inf
    x[1, 650] = 0.0                                                      # one token in the padded last block
    x[2, 256:] = -np.inf                                                 # everything in the first block
    x[3, :512] = -np.inf                                                 # nothing in the first two blocks
    p = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    cum = np.cumsum(p, 1)
    f = jax.jit(lambda u: S.sample_categorical(jnp.asarray(x), uniforms=u))
    for uval in [0.0, 0.123, 0.5, 0.77, 0.999, 1 - 2 ** -24]:
        u = np.full((6,), uval, np.float32)
        got = np.asarray(f(jnp.asarray(u)))
        assert (p[np.arange(6), got] > 0).all()
        want = np.array([np.searchsorted(cum[i], np.float64(u[i]) * cum[i, -1], side="right") for i in range(6)])
        np.testing.assert_array_equal(got, np.minimum(want, [np.flatnonzero(p[i])[-1] for i in range(6)]))
    probs = np.array([0.05, 0.0, 0.25, 0.1, 0.6])
    logits = jnp.log(jnp.asarray(np.repeat(probs, 60) / 60, jnp.float32))     # 300 slots: spans 2 blocks
    draws = jax.jit(jax.vmap(lambda kk: S.sample_categorical(logits, key=kk)))(jax.random.split(jax.random.key(1),
                                                                                                  20000))
    freq = np.bincount(np.asarray(draws) // 60, minlength=5) / 20000
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_gumbel_llada_float64_replay():
    x = random_logits(10)
    u = np.random.default_rng(2).random((R, V))                          # float64 uniforms, as torch.rand_like(f64)
    with jax.enable_x64(True):
        for t in (1.0, 0.5):
            got = jax.jit(partial(S.gumbel_argmax_llada, temperature=t))(jnp.asarray(x), uniforms=jnp.asarray(u))
            np.testing.assert_array_equal(got, NP.gumbel_argmax_llada(x, t, u))
        np.testing.assert_array_equal(S.gumbel_argmax_llada(jnp.asarray(x), 0.0), np.argmax(x, -1))
        d = jax.jit(jax.vmap(lambda kk: S.gumbel_argmax_llada(jnp.log(jnp.asarray([0.1, 0.2, 0.7])), 1.0, key=kk)))
        freq = np.bincount(np.asarray(d(jax.random.split(jax.random.key(1), 20000))), minlength=3) / 20000
        np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.015)
    with pytest.raises(ValueError, match="x64"):
        S.gumbel_argmax_llada(jnp.asarray(x), 1.0, uniforms=u)
    fb = np.asarray(S.gumbel_argmax_llada(jnp.asarray(x), 1.0, uniforms=u.astype(np.float32), float64=False))
    assert np.mean(fb == NP.gumbel_argmax_llada(x, 1.0, u)) >= 0.95      # float32 fallback: same draw up to rounding


# ----------------------------------------------------------------------------------------------------------------------
# confidences

HALF = [BF16, np.dtype(np.float16)]


@pytest.mark.parametrize("dt", HALF + [np.dtype(np.float32), np.dtype(np.float64)], ids=str)
def test_confidences_match_numpy(dt):
    x = random_logits(11)
    toks = np.random.default_rng(4).integers(0, V, R)
    with jax.enable_x64(dt == np.float64):
        xj = jnp.asarray(x)
        got = {
            "token": S.token_confidence(xj, jnp.asarray(toks), dt),
            "max": S.max_confidence(xj, dt)[0],
            "margin": S.margin_confidence(xj, dt),
            "negent": S.neg_entropy_confidence(xj, dt),
        }
        want = {
            "token": NP.token_confidence(x, toks, dt), "max": NP.max_confidence(x, dt)[0],
            "margin": NP.margin_confidence(x, dt), "negent": NP.neg_entropy_confidence(x, dt),
        }
        for name in got:
            assert got[name].dtype == dt, name
            if dt.itemsize == 2:
                _ulp_close(got[name], want[name], dt)
            else:
                np.testing.assert_allclose(np.asarray(got[name], np.float64), np.asarray(want[name], np.float64),
                                           rtol=1e-5 if dt == np.float32 else 1e-12, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(S.max_confidence(xj, dt)[1], NP.max_confidence(x, dt)[1])
        p = S.probs(xj, jnp.float32)
        np.testing.assert_allclose(S.clamped_entropy(p), NP.clamped_entropy(np.asarray(p)), rtol=1e-5)


def test_neg_entropy_rounds_every_op():
    """Dream's Σ p·log(p + 1e-10) on bf16 tensors differs from the same sum done in float32 and rounded once."""
    x = random_logits(12)
    got = np.asarray(S.neg_entropy_confidence(jnp.asarray(x), jnp.bfloat16)).astype(np.float64)
    p = NP.softmax(x, BF16).astype(np.float64)
    once = (p * np.log(p + 1e-10)).sum(-1).astype(np.float32).astype(BF16).astype(np.float64)
    assert np.mean(got != once) > 0.1
    _ulp_close(got, NP.neg_entropy_confidence(x, BF16), BF16)


def test_max_confidence_ties_on_rounded_probabilities():
    """Dream T = 0: (c, x0) = max over bf16 probabilities; distinct logits can tie there and the lower index wins."""
    x = np.array([[2.0, 2.002, -1.0, -1.0]], np.float32)
    p = NP.softmax(x, BF16)
    assert p[0, 0] == p[0, 1]                                            # the setup really ties in bf16
    conf, idx = S.max_confidence(jnp.asarray(x), jnp.bfloat16)
    assert int(idx[0]) == 0 and int(S.greedy(jnp.asarray(x))[0]) == 1
    assert float(conf[0]) == float(p[0, 0])


# ----------------------------------------------------------------------------------------------------------------------
# per-reference compositions

@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_sample_dream_greedy(alg):
    x = random_logits(13, BF16)
    conf, x0 = jax.jit(partial(S.sample_dream, temperature=0.0, top_p=0.95, alg=alg))(jnp.asarray(x))
    y = np.where(NP.top_p_keep(x, 0.95, BF16), np.asarray(x, np.float32), -np.inf)
    want_c, want_x = NP.max_confidence(y, BF16)
    if alg == "topk_margin":
        want_c = NP.margin_confidence(y, BF16)
    elif alg == "entropy":
        want_c = NP.neg_entropy_confidence(y, BF16)
    np.testing.assert_array_equal(x0, want_x)
    assert conf.dtype == jnp.bfloat16
    _ulp_close(conf, want_c, BF16)


def test_sample_dream_sampled_tokens_replay():
    x = random_logits(14, BF16)
    toks = np.random.default_rng(5).integers(0, 3, R)
    conf, x0 = S.sample_dream(jnp.asarray(x), temperature=0.7, tokens=jnp.asarray(toks))
    y = (np.asarray(x, np.float32) * (np.float32(1) / np.float32(0.7))).astype(BF16)
    np.testing.assert_array_equal(x0, toks)
    _ulp_close(conf, NP.token_confidence(y, toks, BF16), BF16)
    # the SLIM Dream port: `logits.float()` first, so temperature and probabilities are float32
    conf32, _ = S.sample_dream(jnp.asarray(x), temperature=0.7, tokens=jnp.asarray(toks), dtype=jnp.float32)
    y32 = np.asarray(x, np.float32) * (np.float32(1) / np.float32(0.7))
    assert conf32.dtype == jnp.float32
    np.testing.assert_allclose(conf32, NP.token_confidence(y32, toks, np.float32), rtol=1e-6)


def test_sample_sdar_and_mask_token_flag():
    x = random_logits(15, np.float16)
    toks = np.asarray(S.greedy(jnp.asarray(x)))                         # replayed draws (always admissible)
    f = jax.jit(partial(S.sample_sdar, temperature=0.8, top_k=10, top_p=0.9))
    x0, p0 = f(jnp.asarray(x), tokens=jnp.asarray(toks))
    y = (np.asarray(x, np.float32) * (np.float32(1) / np.float32(0.8))).astype(np.float16)
    y = np.where(NP.top_k_keep(y, 10), y, -np.inf).astype(np.float16)
    y = np.where(NP.top_p_keep(y, 0.9, np.float16), y, -np.inf).astype(np.float16)
    assert p0.dtype == jnp.float16
    _ulp_close(p0, NP.token_confidence(y, toks, np.float16), np.float16)
    # greedy mode (A6): argmax of the raw logits, untempered probability
    g0, gp = S.sample_sdar(jnp.asarray(x), greedy_decode=True)
    np.testing.assert_array_equal(g0, np.argmax(np.asarray(x, np.float32), -1))
    _ulp_close(gp, NP.token_confidence(x, np.argmax(np.asarray(x, np.float32), -1), np.float16), np.float16)
    # the reference can propose the mask token itself; forbid=mask_id never does
    mask_id = 7
    z = jnp.asarray(x).at[:, mask_id].set(30.0)
    assert (np.asarray(S.sample_sdar(z, greedy_decode=True)[0]) == mask_id).all()
    assert not (np.asarray(S.sample_sdar(z, greedy_decode=True, forbid=mask_id)[0]) == mask_id).any()
    s0, _ = S.sample_sdar(z, temperature=1.0, key=jax.random.key(0), forbid=mask_id)
    assert not (np.asarray(s0) == mask_id).any()


def test_sample_llada_confidence_is_untempered():
    x = random_logits(16, BF16)
    x0, c = S.sample_llada(jnp.asarray(x))
    np.testing.assert_array_equal(x0, np.argmax(np.asarray(x, np.float32), -1))
    assert c.dtype == jnp.bfloat16
    _ulp_close(c, NP.token_confidence(x, np.asarray(x0), BF16), BF16)
    u = np.random.default_rng(6).random((R, V))
    with jax.enable_x64(True):
        x0, c = S.sample_llada(jnp.asarray(x), temperature=0.7, uniforms=jnp.asarray(u), conf_dtype=jnp.float64)
        np.testing.assert_array_equal(x0, NP.gumbel_argmax_llada(x, 0.7, u))
        np.testing.assert_allclose(c, NP.token_confidence(x, np.asarray(x0), np.float64), rtol=1e-12)


def test_first_argmax_is_numpy_argmax():
    """Ties (first index), all -inf rows, NaN rows (the first NaN, as jnp/np.argmax), bf16, and 3-D input."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (7, 3, 50)).astype(np.float32)  # many exact ties
    x[0, 0] = -np.inf
    x[1, 1, [4, 9]] = np.nan
    x[2, 2, 30] = np.inf
    got = np.asarray(S.first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    xb = jnp.asarray(rng.normal(size=(5, 300)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(S.first_argmax(xb)), np.argmax(np.asarray(xb, np.float32), axis=-1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nucleus_fast_path_equals_full_path(dtype):
    """The top-candidates nucleus sampler (sample_sdar with a key, top-p, no top-k) draws the same tokens with the
    same p0 as filter -> inverse CDF -> token_confidence over the whole vocabulary, given the same uniforms: on peaked
    rows it decides from 64 candidates, and a batch holding one flat row takes the full path for that row."""
    rng = np.random.default_rng(3)
    v = 1000
    peaked = rng.normal(size=(40, v)) * 4.0
    flat_row = rng.normal(size=(1, v)) * 0.1                              # nucleus of ~900 tokens: not decided
    u = jnp.asarray(rng.uniform(size=41), jnp.float32)
    for logits, n_dec in ((peaked, 40), (np.concatenate([peaked, flat_row]), 40)):
        x = jnp.asarray(logits, dtype)
        uu = u[:x.shape[0]]
        x0, p0 = S._sample_nucleus(x, 0.9, dtype, None, uniforms=uu)
        xf = S.filter_logits(x, top_p=0.9, prob_dtype=dtype)
        r0 = S.sample_categorical(xf, uniforms=uu)
        np.testing.assert_array_equal(np.asarray(x0), np.asarray(r0))
        ref_p0 = np.asarray(S.token_confidence(xf, r0, dtype), np.float32)  # f32 sums in another order: 2 ulp
        np.testing.assert_allclose(np.asarray(p0, np.float32), ref_p0, rtol=2 * float(jnp.finfo(dtype).eps), atol=0)
        assert int(jnp.sum(S.top_p_keep(x, 0.9, prob_dtype=dtype)[:40], axis=-1).max()) < 64  # decided rows
    key = jax.random.key(0)  # the keyed entry point takes the fast path and samples inside the nucleus
    x = jnp.asarray(peaked, dtype)
    x0, _ = S.sample_sdar(x, temperature=1.0, top_k=0, top_p=0.9, dtype=dtype, key=key)
    keep = np.asarray(S.top_p_keep(x, 0.9, prob_dtype=dtype))
    assert keep[np.arange(40), np.asarray(x0)].all()
