"""Commit rules (dlmjax.decode.rules) against the NumPy re-statements in tests/reference/np_rules.py, on random and
hand-made cases (ties, empty candidate sets, all / none masked, exact budget hits, the SLIM-RL Figure 1 case)."""
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dlmjax.decode import rules as R
from tests.reference import np_rules as NP

BF16 = np.dtype(ml_dtypes.bfloat16)
B, K = 96, 16


def random_case(seed: int, dtype):
    """Rows mixing uniform, near-one, heavily tied and exactly-dyadic confidences; masks from empty to full."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, size=(B, 1))
    uni = rng.random((B, K))
    near1 = 1.0 - rng.exponential(0.04, (B, K))
    tied = rng.choice([0.5, 0.875, 0.9, 0.9375, 0.95, 0.96875, 0.99], size=(B, K))
    dyadic = 1.0 - rng.integers(1, 16, (B, K)) / 64.0
    conf = np.select([kind == 0, kind == 1, kind == 2], [uni, near1, tied], dyadic).clip(0.0, 1.0)
    density = rng.choice([0.0, 0.25, 0.6, 1.0], size=(B, 1))
    masked = rng.random((B, K)) < density
    n = rng.integers(0, K + 3, size=B).astype(np.int32)
    c = conf.astype(np.float32).astype(dtype)
    return c, masked, n


DTYPES = [np.dtype(np.float32), BF16]

# (jax rule with static options bound, numpy rule, which extra argument)
RULES = {
    "top_n": (partial(R.commit_top_n), NP.top_n),
    "top_n_overflow": (partial(R.commit_top_n, masked_only=False), partial(NP.top_n, masked_only=False)),
    "dynamic": (partial(R.commit_dynamic_threshold, tau=0.9), partial(NP.dynamic_threshold, tau=0.9)),
    "dynamic_overflow": (partial(R.commit_dynamic_threshold, tau=0.9, masked_only=False),
                         partial(NP.dynamic_threshold, tau=0.9, masked_only=False)),
    "contiguous": (partial(R.commit_contiguous_dynamic, tau=0.9), partial(NP.contiguous_dynamic, tau=0.9)),
    "nlc": (partial(R.commit_nlc_bounded_dynamic, nlc_budget=0.3), partial(NP.nlc_bounded_dynamic, budget=0.3)),
    "gc": (partial(R.commit_gc_dynamic, tau=0.9), partial(NP.gc_dynamic, tau=0.9)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_matches_numpy_random(name, dtype):
    jfn, nfn = RULES[name]
    jf = jax.jit(jfn)
    for seed in range(3):
        c, m, n = random_case(seed, dtype)
        arg = n if name != "gc" else (n % 5)                              # gc: steps left (incl. 0 → max(1, .))
        got = np.asarray(jf(jnp.asarray(c), jnp.asarray(m), jnp.asarray(arg)))
        want = nfn(c, m, arg)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} seed {seed}")
        if "overflow" not in name:
            assert not (got & ~m).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fast_dllm_rules_random(dtype):
    thr = jax.jit(partial(R.commit_fast_dllm_threshold, tau=0.9))
    fac = jax.jit(partial(R.commit_fast_dllm_factor, factor=1.0))
    for seed in range(3):
        c, m, _ = random_case(seed + 10, dtype)
        cj, mj = jnp.asarray(c), jnp.asarray(m)
        np.testing.assert_array_equal(np.asarray(thr(cj, mj)), NP.fast_dllm_threshold(c, m, 0.9))
        np.testing.assert_array_equal(np.asarray(fac(cj, mj)), NP.fast_dllm_factor(c, m, 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequential_and_entropy_bounded_random(dtype):
    seq = jax.jit(R.commit_sequential)
    seq_all = jax.jit(partial(R.commit_sequential, masked_only=False))
    eb = jax.jit(partial(R.commit_entropy_bounded, eb_threshold=1.5))
    for seed in range(3):
        c, m, n = random_case(seed + 20, dtype)
        np.testing.assert_array_equal(np.asarray(seq(jnp.asarray(m), jnp.asarray(n))), NP.sequential(m, n))
        np.testing.assert_array_equal(np.asarray(seq_all(jnp.asarray(m), jnp.asarray(n))),
                                      NP.sequential(m, n, masked_only=False))
        ent = (-np.log(np.asarray(c, np.float64).clip(1e-3, 1))).astype(np.float32).astype(dtype)   # ties included
        np.testing.assert_array_equal(np.asarray(eb(jnp.asarray(ent), jnp.asarray(m))), NP.entropy_bounded(ent, m, 1.5))


def _boundary_rows(c, m, n, tau, mm, ulps):
    """Rows whose budget decision would change if the cumulative sums moved by ±3 ulps (summation order)."""
    lo = NP.tau_budget(c, m, n, tau, m=mm, budget_ulps=ulps - 3)
    hi = NP.tau_budget(c, m, n, tau, m=mm, budget_ulps=ulps + 3)
    return (lo != hi).any(axis=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mm,ulps", [(1.0, 1), (0.0, 1), (2.5, 0)])
def test_tau_budget_random(dtype, mm, ulps):
    jf = jax.jit(partial(R.commit_tau_budget, tau=0.9, m=mm, budget_ulps=ulps))
    skipped = 0
    for seed in range(3):
        c, m, n = random_case(seed + 30, dtype)
        got = np.asarray(jf(jnp.asarray(c), jnp.asarray(m), jnp.asarray(n)))
        want = NP.tau_budget(c, m, n, 0.9, m=mm, budget_ulps=ulps)
        edge = _boundary_rows(c, m, n, 0.9, mm, ulps)
        skipped += int(edge.sum())
        np.testing.assert_array_equal(got[~edge], want[~edge])
        assert not (got & ~m).any()
        # never more than dynamic sampling once the floor n is met: a prefix of the same candidates
        dyn = NP.dynamic_threshold(c, m, n, 0.9)
        assert ((got & ~dyn).sum(1)[dyn.sum(1) >= np.minimum(n, m.sum(1))] == 0).all()
    assert skipped <= 0.1 * 3 * B


def test_array_thresholds_match_python_floats():
    """τ (and m) as traced arrays, scalar or per row: with a dyadic τ the budget is exact, so the array path must
    equal the Python-float path; a per-row τ must equal the rule applied row by row."""
    c, m, n = random_case(50, np.float32)
    cj, mj, nj = jnp.asarray(c), jnp.asarray(m), jnp.asarray(n)
    t = jnp.asarray(0.75)
    np.testing.assert_array_equal(jax.jit(R.commit_dynamic_threshold)(cj, mj, nj, t),
                                  NP.dynamic_threshold(c, m, n, 0.75))
    np.testing.assert_array_equal(jax.jit(R.commit_contiguous_dynamic)(cj, mj, nj, t),
                                  NP.contiguous_dynamic(c, m, n, 0.75))
    np.testing.assert_array_equal(jax.jit(R.commit_gc_dynamic)(cj, mj, nj % 5, t), NP.gc_dynamic(c, m, n % 5, 0.75))
    np.testing.assert_array_equal(jax.jit(R.commit_fast_dllm_threshold)(cj, mj, t), NP.fast_dllm_threshold(c, m, 0.75))
    tb = jax.jit(partial(R.commit_tau_budget, budget_ulps=0))
    for mm in (1.0, 0.0, 2.0):
        np.testing.assert_array_equal(tb(cj, mj, nj, jnp.asarray(0.75), m=jnp.asarray(mm)),
                                      NP.tau_budget(c, m, n, 0.75, m=mm, budget_ulps=0), err_msg=str(mm))
    taus = np.where(np.arange(B) % 2 == 0, 0.75, 0.875)
    got = np.asarray(tb(cj, mj, nj, jnp.asarray(taus), m=jnp.asarray(1.0)))
    for t in (0.75, 0.875):
        rows = taus == t
        np.testing.assert_array_equal(got[rows], NP.tau_budget(c[rows], m[rows], n[rows], t, m=1.0, budget_ulps=0))


# ----------------------------------------------------------------------------------------------------------------------
# hand-made cases

W = 8   # hand-made rows are padded to one width with non-masked slots, so eager ops compile once per dtype


def _row(vals, dtype, masked=None):
    pad = W - len(vals)
    c = jnp.asarray(np.asarray([list(vals) + [0.0] * pad], np.float64), dtype)
    masked = [True] * len(vals) if masked is None else list(masked)
    return c, jnp.asarray([masked + [False] * pad])


def _idx(sel):
    return list(np.nonzero(np.asarray(sel)[0])[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64], ids=str)
def test_slimrl_figure1_case(dtype):
    """0.99, 0.96, 0.94 > τ 0.9 with m = 1: dynamic commits all three, τ-budget two (0.01 + 0.05 + 0.11 > 0.1)."""
    with jax.enable_x64(dtype == jnp.float64):
        c, m = _row([0.94, 0.3, 0.99, 0.96, 0.2], dtype)
        assert _idx(R.commit_dynamic_threshold(c, m, 1, 0.9)) == [0, 2, 3]
        assert _idx(R.commit_tau_budget(c, m, 1, 0.9, m=1.0)) == [2, 3]
        assert _idx(R.commit_tau_budget(c, m, 1, 0.9, m=1.0, budget_ulps=0)) == [2, 3]
        np.testing.assert_array_equal(R.commit_tau_budget(c, m, 1, 0.9), NP.tau_budget(np.asarray(c), np.asarray(m),
                                                                                           [1], 0.9))


@pytest.mark.parametrize("dtype,expected", [(jnp.float64, [1, 2]), (jnp.float32, [0, 1, 2])], ids=str)
def test_slimrl_exact_budget_depends_on_dtype(dtype, expected):
    """0.99, 0.97, 0.94: uncertainties sum to the budget 0.1 in exact arithmetic. float64 (SLIM LLaDA port):
    0.1000000000000001 > 0.09999999999999998, two commits; float32 (jetengine): 0.09999996 ≤ f32(0.1), three."""
    with jax.enable_x64(dtype == jnp.float64):
        c, m = _row([0.94, 0.99, 0.97, 0.5], dtype)
        for ulps in (0, 1):
            assert _idx(R.commit_tau_budget(c, m, 1, 0.9, m=1.0, budget_ulps=ulps)) == expected
        np.testing.assert_array_equal(R.commit_tau_budget(c, m, 1, 0.9),
                                      NP.tau_budget(np.asarray(c), np.asarray(m), [1], 0.9))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64], ids=str)
def test_tau_budget_exact_hit_and_floor(dtype):
    """Dyadic values, exact in every dtype: τ 0.75, m 1 → b 0.25; u = 0.125 each: 0.125, 0.25 (= b, within),
    0.375."""
    with jax.enable_x64(dtype == jnp.float64):
        c, m = _row([0.875, 0.5, 0.875, 0.875], dtype)
        assert _idx(R.commit_tau_budget(c, m, 1, 0.75, m=1.0, budget_ulps=0)) == [0, 2]
        assert _idx(R.commit_tau_budget(c, m, 3, 0.75, m=1.0)) == [0, 2, 3]           # floor n = 3
        assert _idx(R.commit_tau_budget(c, m, 9, 0.75, m=1.0)) == [0, 1, 2, 3]        # capped at |M|
        assert _idx(R.commit_tau_budget(c, m, 2, 0.75, m=0.0)) == [0, 2, 3]           # m ≤ 0 → m = n = 2: b = 0.5


def test_tau_budget_one_ulp_over_counts_as_within():
    """float32 sums 0.5 + 2^-24 (one ulp above b = 2·(1 - 0.75)): committed with budget_ulps=1, not with 0."""
    c, m = _row([0.8125, 0.875 - 2.0 ** -24, 0.8125], jnp.float32)
    assert _idx(R.commit_tau_budget(c, m, 1, 0.75, m=2.0, budget_ulps=1)) == [0, 1, 2]
    assert _idx(R.commit_tau_budget(c, m, 1, 0.75, m=2.0, budget_ulps=0)) == [0, 1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=str)
def test_empty_candidate_set_falls_back_to_n(dtype):
    c, m = _row([0.5, 0.7, 0.6, 0.2], dtype)
    for sel in (R.commit_dynamic_threshold(c, m, 2, 0.9), R.commit_tau_budget(c, m, 2, 0.9),
                R.commit_contiguous_dynamic(c, m, 2, 0.9)):
        assert _idx(sel) == [1, 2]
    assert _idx(R.commit_tau_budget(c, m, 0, 0.9)) == []                 # no candidate, no floor: nothing
    assert _idx(R.commit_fast_dllm_threshold(c, m, 0.9)) == [1]          # the first is always kept
    assert _idx(R.commit_gc_dynamic(c, m, 4, 0.9)) == [1]                # pace ⌈4/4⌉ = 1


def test_ties_go_to_the_lower_index():
    c, m = _row([0.5, 0.9, 0.9, 0.9, 0.9], jnp.bfloat16, [True, True, False, True, True])
    assert _idx(R.commit_top_n(c, m, 2)) == [1, 3]
    assert np.asarray(R.descending_rank(c, m)).tolist() == [[3, 0, 4, 1, 2, 5, 6, 7]]
    e, m = _row([0.2, 0.1, 0.1, 0.1], jnp.float32, [True, True, False, True])
    assert _idx(R.commit_entropy_bounded(e, m, 0.25)) == [1, 3]         # cum 0.1, 0.2 < 0.25, 0.3


def test_all_and_none_masked():
    c, allm = _row([0.93, 0.99, 0.3, 0.97], jnp.float32)
    none = jnp.zeros(c.shape, bool)
    one = jnp.asarray([1], jnp.int32)
    cases = [
        lambda m: R.commit_top_n(c, m, one), lambda m: R.commit_dynamic_threshold(c, m, one, 0.9),
        lambda m: R.commit_tau_budget(c, m, one, 0.9), lambda m: R.commit_fast_dllm_threshold(c, m, 0.9),
        lambda m: R.commit_fast_dllm_factor(c, m, 1.0), lambda m: R.commit_sequential(m, one),
        lambda m: R.commit_contiguous_dynamic(c, m, one, 0.9), lambda m: R.commit_nlc_bounded_dynamic(c, m, one, 0.1),
        lambda m: R.commit_gc_dynamic(c, m, one, 0.9), lambda m: R.commit_entropy_bounded(c, m, 0.1),
    ]
    for f in cases:
        assert not np.asarray(f(none)).any()
    got = [_idx(f(allm)) for f in cases]
    # top-n, dynamic, τ-budget (.01+.03 ≤ .1 < .11), Fast-dLLM τ, factor (fails at the last slot → all),
    # sequential, contiguous (run 0-1; 3 is alone), nlc (.010+.030 ≤ .1 < .114), gc (1 step left → all),
    # entropy (none < .1 → 1)
    assert got == [[1], [0, 1, 3], [1, 3], [0, 1, 3], [0, 1, 2, 3], [0], [0, 1], [1, 3], [0, 1, 2, 3], [2]]


def test_threshold_compared_in_conf_dtype():
    """N5: bf16(0.9) = 0.8984375, so a bf16 confidence 0.8984375 passes `≥ 0.9` (Fast-dLLM-Dream) but not `> 0.9`;
    the same value in float32 fails both."""
    assert float(R.threshold_in(0.9, jnp.bfloat16)) == 0.8984375
    assert float(R.threshold_in(0.85, jnp.float16)) == 0.85009765625
    assert float(R.threshold_in(0.85, jnp.bfloat16)) == 0.8515625
    for dtype, ge in ((jnp.bfloat16, [0, 1]), (jnp.float32, [0])):
        c, m = _row([0.9921875, 0.8984375, 0.5], dtype)
        assert _idx(R.commit_fast_dllm_threshold(c, m, 0.9)) == ge
        assert _idx(R.commit_dynamic_threshold(c, m, 1, 0.9)) == [0]


def test_overflow_flag_q3():
    """Asked for more slots than remain masked: masked_only=False commits non-masked slots too (reference quirk Q3)."""
    c, m = _row([0.2, 0.95, 0.4, 0.1], jnp.float32, [False, True, False, True])
    assert _idx(R.commit_top_n(c, m, 3)) == [1, 3]
    assert _idx(R.commit_top_n(c, m, 3, masked_only=False)) == [0, 1, 3]
    assert _idx(R.commit_dynamic_threshold(c, m, 3, 0.9, masked_only=False)) == [0, 1, 3]
    assert _idx(R.commit_sequential(m, 2)) == [1]
    assert _idx(R.commit_sequential(m, 2, masked_only=False)) == [1, 2]


def test_fast_dllm_factor_quirk():
    """θ_r = 1 - f/(r+2); a break at the last slot is bumped to commit it anyway."""
    c, m = _row([0.5, 0.99, 0.9], jnp.float32)
    assert _idx(R.commit_fast_dllm_factor(c, m, 1.0)) == [0, 1, 2]      # 0.5 < 0.75 fails at r = 2 = |M|-1
    c, m = _row([0.4, 0.99, 0.5, 0.3], jnp.float32)
    assert _idx(R.commit_fast_dllm_factor(c, m, 1.0)) == [1]            # 0.5 < 0.667 fails at r = 1
    c, m = _row([0.4, 0.99, 0.7, 0.95], jnp.float32)
    assert _idx(R.commit_fast_dllm_factor(c, m, 1.0)) == [1, 3]         # fails at r = 2 (0.7 < 0.75), |M| = 4
    c, m = _row([0.1, 0.2], jnp.float32, [False, True])
    assert _idx(R.commit_fast_dllm_factor(c, m, 1.0)) == [1]


def test_contiguous_runs():
    vals = [0.95, 0.2, 0.97, 0.98, 0.1, 0.99, 0.3, 0.3]
    c, m = _row(vals, jnp.float32)
    assert _idx(R.commit_contiguous_dynamic(c, m, 1, 0.9)) == [0, 2, 3]  # single at the first masked slot, a run of 2
    c, m = _row(vals, jnp.float32, [False] + [True] * 7)
    assert _idx(R.commit_contiguous_dynamic(c, m, 1, 0.9)) == [2, 3]     # 0 no longer masked; 5 is a lone candidate
    assert _idx(R.commit_contiguous_dynamic(c, m, 3, 0.9)) == [2, 3, 5]  # topped up to n by confidence


def test_nlc_and_gc_by_hand():
    c, m = _row([0.9, 0.8, 0.99, 0.5], jnp.float32)
    # -log c: .105, .223, .010, .693 → sorted cum .010, .115, .338, 1.03
    assert _idx(R.commit_nlc_bounded_dynamic(c, m, 1, 0.2)) == [0, 2]
    assert _idx(R.commit_nlc_bounded_dynamic(c, m, 1, 0.5)) == [0, 1, 2]
    assert _idx(R.commit_nlc_bounded_dynamic(c, m, 4, 0.0)) == [0, 1, 2, 3]
    c, m = _row([0.95, 0.99, 0.97, 0.96, 0.2, 0.1, 0.3, 0.4], jnp.float32)
    # |M| 8, 4 steps left: pace 2, cap max(2, 4) = 4, 4 above τ → 4
    assert _idx(R.commit_gc_dynamic(c, m, 4, 0.9)) == [0, 1, 2, 3]
    # 1 step left: pace 8 → everything
    assert len(_idx(R.commit_gc_dynamic(c, m, 1, 0.9))) == 8
    # 0 steps left is treated as 1
    assert len(_idx(R.commit_gc_dynamic(c, m, 0, 0.9))) == 8


def test_entropy_bounded_at_least_one():
    e, m = _row([0.1, 0.2, 0.05, 1.0], jnp.float32)
    assert _idx(R.commit_entropy_bounded(e, m, 0.3)) == [0, 2]          # cum .05, .15 < .3 ≤ .35
    assert _idx(R.commit_entropy_bounded(e, m, 0.01)) == [2]            # none below: still one


# ----------------------------------------------------------------------------------------------------------------------
# stochastic rules

def test_random_and_origin_replay():
    rng = np.random.default_rng(0)
    u = rng.random((B, K)).astype(np.float32)
    _, m, n = random_case(40, np.float32)
    np.testing.assert_array_equal(R.commit_random_top_n(jnp.asarray(m), jnp.asarray(n), uniforms=u),
                                  NP.top_n(u, m, n))
    got = np.asarray(R.commit_random_top_n(jnp.asarray(m), jnp.asarray(n), key=jax.random.key(1)))
    np.testing.assert_array_equal(got.sum(1), np.minimum(n, m.sum(1)))
    for p in (0.3, 1.0):
        np.testing.assert_array_equal(R.commit_dream_origin(jnp.asarray(m), p, uniforms=u), NP.dream_origin(m, p, u))
    assert np.array_equal(np.asarray(R.commit_dream_origin(jnp.asarray(m), 1.0, key=jax.random.key(2))), m)
    v = jnp.asarray([[0.25, 0.5, 0.75, 0.5]], jnp.float32)             # strict v < p: a draw equal to p stays masked
    assert _idx(R.commit_dream_origin(jnp.ones((1, 4), bool), 0.5, uniforms=v)) == [0]
    with pytest.raises(ValueError):
        R.commit_dream_origin(jnp.asarray(m), 0.5)


def test_dream_topk_alg_temp_replay_and_distribution():
    c, m, n = random_case(41, BF16)
    k = jnp.asarray(3)
    g = np.random.default_rng(3).gumbel(size=(B, K)).astype(np.float32)
    got = R.commit_dream_topk(jnp.asarray(c), jnp.asarray(m), k, alg_temp=0.5, gumbel=g)
    np.testing.assert_array_equal(got, NP.dream_gumbel_topk(c, m, np.full(B, 3), 0.5, g))
    np.testing.assert_array_equal(R.commit_dream_topk(jnp.asarray(c), jnp.asarray(m), k, alg_temp=None),
                                  NP.top_n(c, m, np.full(B, 3)))
    # key path: first pick ~ softmax(C / alg_temp) over the masked slots
    conf = jnp.asarray([[0.2, 0.6, 0.9, 0.1]], jnp.float32)
    mk = jnp.asarray([[True, True, True, False]])
    draw = jax.jit(jax.vmap(lambda kk: R.commit_dream_topk(conf, mk, 1, alg_temp=0.25, key=kk)[0]))
    freq = np.asarray(draw(jax.random.split(jax.random.key(0), 20000))).mean(0)
    want = np.exp(np.array([0.2, 0.6, 0.9]) / 0.25)
    np.testing.assert_allclose(freq[:3], want / want.sum(), atol=0.015)
    assert freq[3] == 0
