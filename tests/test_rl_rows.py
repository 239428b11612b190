"""RL rows and layout against the NumPy re-statement of the spec (tests/reference/np_rl.py): quadrature, block
schedule, SLIM / random / coupled / TraceRL rows (both block alignments), positions, the block attention mask,
advantages and filters, and the batcher. Host-side except the mask; no model."""

import numpy as np
import pytest

from dlmjax.rl import advantages as adv_lib
from dlmjax.rl import layout, masking, quadrature, slicing
from dlmjax.rl.batch import build_rows, make_batch, split_minibatches
from dlmjax.rl.config import RLObjectiveConfig
from tests.reference import np_rl as ref

PAD, MASK, V = 0, 99, 50


def rollouts(seed, n=5, max_p=9, max_r=13, steps=True):
    """n random rollouts: prompts of 1..max_p tokens, responses of 0..max_r tokens, step maps with repeats."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, V, rng.integers(1, max_p + 1)) for _ in range(n)]
    resps = [rng.integers(2, V, rng.integers(0, max_r + 1)) for _ in range(n)]
    resps[0] = rng.integers(2, V, max_r)  # the longest sets L1
    sms = [np.sort(rng.integers(1, max(len(r) // 2, 1) + 2, len(r))) for r in resps]
    return prompts, resps, (sms if steps else None)


def as_rows(rows):
    """Rows -> comparable list of (rollout, noisy, targets, weight)."""
    return [(int(a), b.tolist(), c.tolist(), round(float(d), 6)) for a, b, c, d in
            zip(rows.rollout, rows.noisy, rows.targets, rows.weight)]


def ref_rows(rows):
    return [(int(a), np.asarray(b).tolist(), np.asarray(c).tolist(), round(float(d), 6)) for a, b, c, d in rows]


# --- quadrature and schedule ------------------------------------------------------------------------------------------

def test_gauss_legendre_three_nodes_and_general_n():
    t, w = quadrature.gauss_legendre(3)
    s = np.sqrt(3 / 5)
    np.testing.assert_allclose(t, [(1 - s) / 2, 0.5, (1 + s) / 2], atol=1e-15)
    np.testing.assert_allclose(w, [5 / 18, 8 / 18, 5 / 18], atol=1e-15)
    np.testing.assert_allclose(t, [0.1127017, 0.5, 0.8872983], atol=1e-7)  # the table
    for n in range(1, 8):
        t, w = quadrature.gauss_legendre(n)
        rt, rw = ref.gauss_legendre(n)
        np.testing.assert_allclose(t, rt, atol=1e-12)
        np.testing.assert_allclose(w, rw, atol=1e-12)
        assert abs(w.sum() - 1) < 1e-12 and abs((w * t).sum() - 0.5) < 1e-12
        # exact for polynomials of degree 2n - 1 on [0, 1]
        np.testing.assert_allclose((w * t ** (2 * n - 1)).sum(), 1 / (2 * n), rtol=1e-12)


@pytest.mark.parametrize("shape", ["cosine", "linear"])
@pytest.mark.parametrize("increasing", [False, True])
def test_block_schedule_matches_spec(shape, increasing):
    for t in [*quadrature.gauss_legendre(3)[0], 0.03, 0.97, 0.5]:
        for J in (1, 2, 3, 5, 16, 17, 64):
            p = quadrature.block_schedule(float(t), J, 0.2, shape, increasing)
            assert p.dtype == np.float32 and p.shape == (J,)
            np.testing.assert_allclose(p, ref.schedule(float(t), J, 0.2, shape, increasing), atol=3e-7)
            assert abs(p.astype(np.float64).mean() - t) < 1e-6  # mean-preserving
            assert np.all(p > 0) and np.all(p < 1)
            if J > 1:
                step = np.diff(p.astype(np.float64))
                assert np.all(step >= -1e-7) if increasing else np.all(step <= 1e-7)
    # the ranges at t1 for cosine, decreasing: 0.2127 -> 0.0127
    p = quadrature.block_schedule(float(quadrature.gauss_legendre(3)[0][0]), 16)
    np.testing.assert_allclose([p[0], p[-1]], [0.2127017, 0.0127017], atol=1e-6)


def test_num_blocks_counts_the_padded_length():
    for l1, k, j in [(1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 16, 1), (17, 16, 2), (256, 16, 16), (250, 16, 16)]:
        assert quadrature.num_blocks(l1, k) == j


# --- packing and positions --------------------------------------------------------------------------------------------

def test_pack_rollouts_pads_truncates_and_extends_step_maps():
    pk = layout.pack_rollouts([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14, 15]], PAD,
                              step_maps=[[2, 1], [1, 1, 3, 4, 9]], max_gen_length=4)
    assert pk.l0 == 3 and pk.l1 == 4
    assert pk.prompt.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert pk.prompt_valid.tolist() == [[True] * 3, [False, False, True]]
    assert pk.response.tolist() == [[9, 10, 0, 0], [11, 12, 13, 14]]
    assert pk.resp_len.tolist() == [2, 4]
    assert pk.step_map.tolist() == [[2, 1, 3, 3], [1, 1, 3, 4]]  # pads = rollout max + 1
    with pytest.raises(ValueError, match="step map"):
        layout.pack_rollouts([[1]], [[2, 3]], PAD, step_maps=[[1]])
    with pytest.raises(ValueError, match="shorter"):
        layout.pack_rollouts([[1, 2]], [[3]], PAD, l0=1)


def test_positions_match_spec():
    p, r, _ = rollouts(1)
    pk = layout.pack_rollouts(p, r, PAD)
    got = layout.positions(pk.prompt_valid, pk.l1)
    np.testing.assert_array_equal(got, ref.positions(pk.prompt_valid, pk.l1))
    assert got.dtype == np.int32
    # left padding changes nothing but the pad slots
    pk2 = layout.pack_rollouts(p, r, PAD, l0=pk.l0 + 3)
    np.testing.assert_array_equal(layout.positions(pk2.prompt_valid, pk.l1)[:, 3:], got)


# --- SLIM rows --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,align", [(4, "response"), (3, "response"), (4, "absolute")])
def test_slim_rows_match_reference(k, align):
    p, r, _ = rollouts(2, n=6)
    pk = layout.pack_rollouts(p, r, PAD)
    off = layout.block_offsets(pk.prompt_valid, k, align)
    got = masking.slim_rows(pk, MASK, np.random.default_rng(7), k, align=align)
    want = ref.slim_rows(pk.response, pk.resp_len, pk.l1, k, MASK, np.random.default_rng(7), offsets=off)
    assert as_rows(got) == ref_rows(want)
    if align == "absolute":
        assert off.any()  # the option really shifts blocks here
        assert as_rows(got) != as_rows(masking.slim_rows(pk, MASK, np.random.default_rng(7), k))


def test_slim_rows_structure_and_mask_rate():
    p, r, _ = rollouts(3, n=40, max_r=40)
    pk = layout.pack_rollouts(p, r, PAD)
    rows = masking.slim_rows(pk, MASK, np.random.default_rng(0), 4)
    t, w = quadrature.gauss_legendre(3)
    # replicas of a rollout adjacent, in rollout order; weight = node weight; never renormalised
    assert np.all(np.diff(rows.rollout) >= 0)
    assert set(np.round(rows.weight, 6)) <= set(np.round(w.astype(np.float32), 6))
    assert rows.targets.dtype == bool and not (rows.targets & ~pk.resp_valid[rows.rollout]).any()
    # noisy = mask exactly where masked; targets are the masked non-pads
    masked = rows.noisy == MASK
    assert np.array_equal(rows.targets, masked & pk.resp_valid[rows.rollout])
    assert np.array_equal(np.where(masked, pk.response[rows.rollout], rows.noisy), pk.response[rows.rollout])
    # overall mask rate over real tokens ~ sum w t = 0.5
    rate = rows.targets.sum() / (pk.resp_valid[rows.rollout].sum())
    assert 0.45 < rate < 0.55, rate


def test_slim_force_mask_only_when_nothing_masked_and_pad_forced_rows_drop():
    # one real token, L1 = 4 (pads), K = 4: p = t (J = 1); nothing masked is common for the first node
    pk = layout.pack_rollouts([[3]] * 200, [[7], [7, 8, 9, 10]] * 100, PAD)
    masked, _ = masking.slim_masks(pk, np.random.default_rng(0), 4)
    assert masked.any(-1).all()  # force-mask fired wherever nothing was masked
    rows = masking.slim_rows(pk, MASK, np.random.default_rng(0), 4)
    per = np.bincount(rows.rollout, minlength=200)
    assert per.max() == 3 and per[0::2].min() < 3  # replicas whose only mask is a pad were dropped
    want = ref.slim_rows(pk.response, pk.resp_len, pk.l1, 4, MASK, np.random.default_rng(0))
    assert as_rows(rows) == ref_rows(want)


# --- random / coupled rows ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("coupled", [False, True])
def test_random_rows_match_reference(coupled):
    p, r, _ = rollouts(4, n=8)
    pk = layout.pack_rollouts(p, r, PAD)
    got = masking.random_rows(pk, MASK, np.random.default_rng(3), 0.1, 0.9, coupled)
    want = ref.random_rows(pk.response, pk.resp_len, pk.l1, MASK, np.random.default_rng(3), coupled=coupled)
    assert as_rows(got) == ref_rows(want)
    if coupled:  # every complement row after every primary row, targets disjoint
        prim = masking.random_rows(pk, MASK, np.random.default_rng(3))
        n = len(prim)
        assert as_rows(got)[:n] == as_rows(prim)
        for i in range(n, len(got)):
            j = np.flatnonzero(prim.rollout == got.rollout[i])
            if len(j):
                assert not (got.targets[i] & prim.targets[j[0]]).any()


def test_random_rows_mask_rate_and_no_force():
    pk = layout.pack_rollouts([[1]] * 400, [list(range(2, 40))] * 400, PAD)
    rows = masking.random_rows(pk, MASK, np.random.default_rng(0))
    assert abs(rows.targets.mean() - 0.5) < 0.01
    pk1 = layout.pack_rollouts([[1]] * 400, [[5]] * 400, PAD)  # one token: ~half the rows stay unmasked, dropped
    assert 150 < len(masking.random_rows(pk1, MASK, np.random.default_rng(0))) < 250


# --- TraceRL slicing -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,shrink,align", [(4, 1, "response"), (4, 2, "response"), (3, 1, "response"),
                                            (8, 4, "response"), (4, 1, "absolute"), (4, 3, "absolute")])
def test_tracerl_rows_match_reference(k, shrink, align):
    p, r, sm = rollouts(5, n=7, max_r=15)
    pk = layout.pack_rollouts(p, r, PAD, step_maps=sm)
    off = layout.block_offsets(pk.prompt_valid, k, align)
    got = slicing.tracerl_rows(pk, MASK, k, shrink, align)
    want = ref.tracerl_rows(pk.response, pk.resp_len, sm, pk.l1, k, MASK, shrink, offsets=off)
    assert as_rows(got) == ref_rows(want)
    # every real token is a target exactly once; rows per rollout <= max_j ceil(U_j / s)
    cover = np.zeros(pk.response.shape, int)
    np.add.at(cover, got.rollout, got.targets.astype(int))
    assert np.array_equal(cover, pk.resp_valid.astype(int))
    assert np.all(got.weight == 1.0)


def test_tracerl_slicing_worked_example():
    # K = 4, L1 = 8: block 0 steps [1 1 2 3], block 1 steps [4 5 | pad pad] -> pads get 6
    pk = layout.pack_rollouts([[1]], [[10, 11, 12, 13, 14, 15]], PAD, step_maps=[[1, 1, 2, 3, 4, 5]], l1=8)
    rows = slicing.tracerl_rows(pk, MASK, 4, 1)
    M = MASK
    assert rows.noisy.tolist() == [[M, M, M, M, M, M, M, M],
                                   [10, 11, M, M, 14, M, M, M],
                                   [10, 11, 12, M, 14, 15, M, M]]
    # round 3 asks for block 0's step 3 and block 1's pads: the pads are dropped, the row is kept
    assert rows.targets.astype(int).tolist() == [[1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 1, 0, 0],
                                                 [0, 0, 0, 1, 0, 0, 0, 0]]
    # shrink 2: block 0 {1,2,3} -> 2,2,3 ; block 1 {4,5,6} -> 5,5,6: two rounds
    two = slicing.tracerl_rows(pk, MASK, 4, 2)
    assert len(two) == 2 and two.targets[0].tolist() == [1, 1, 1, 0, 1, 1, 0, 0]
    # a round whose targets are only pads is dropped: steps [1 2 3 pad | pad x4] -> 4 rounds, 3 rows
    pk2 = layout.pack_rollouts([[1]], [[10, 11, 12]], PAD, step_maps=[[1, 2, 3]], l1=8)
    assert len(slicing.tracerl_rows(pk2, MASK, 4, 1)) == 3


def test_step_groups_shrink_rule():
    sm = np.array([[5, 1, 9, 5, 2, 7, 7, 3]])
    grp = slicing.step_groups(sm, np.zeros_like(sm), shrink=2)  # distinct 1 2 3 5 7 9 -> groups 0 0 1 1 2 2
    assert grp.tolist() == [[1, 0, 2, 1, 0, 2, 2, 1]]


# --- the layout mask --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("l0,l1,k", [(5, 7, 4), (8, 8, 4), (3, 9, 4), (6, 5, 2), (4, 6, 1), (0 + 2, 4, 16)])
@pytest.mark.parametrize("align", ["response", "absolute"])
def test_extended_attention_mask_matches_reference(l0, l1, k, align):
    rng = np.random.default_rng(l0 * 100 + l1)
    plen = rng.integers(0, l0 + 1, 4)
    plen[0] = l0
    pv = np.arange(l0)[None] >= (l0 - plen)[:, None]
    got = np.asarray(layout.extended_attention_mask(l0, l1, k, pv, align))
    want = ref.attention_mask(l0, l1, k, pv, align)
    assert got.shape == (4, l0 + 2 * l1, l0 + 2 * l1)
    np.testing.assert_array_equal(got, want)


def test_mask_alignments_differ_only_when_prompt_is_unaligned():
    pv = np.ones((1, 8), bool)  # P = 8, K = 4: aligned -> identical
    a = np.asarray(layout.extended_attention_mask(8, 8, 4, pv, "response"))
    b = np.asarray(layout.extended_attention_mask(8, 8, 4, pv, "absolute"))
    np.testing.assert_array_equal(a, b)
    pv[0, :1] = False  # P = 7
    a = np.asarray(layout.extended_attention_mask(8, 8, 4, pv, "response"))
    b = np.asarray(layout.extended_attention_mask(8, 8, 4, pv, "absolute"))
    assert (a != b).any()


# --- advantages and filters -------------------------------------------------------------------------------------------

def test_advantages_and_filters():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, (12, 8)).astype(float)
    rewards[0] = 1.0  # std 0
    rewards[1] = [1, 1, 0, 0, 0, 0, 0, 0]  # mean 0.25
    rewards[2] = [1, 0, 0, 0, 0, 0, 0, 0]  # mean 0.125: dropped
    code = rng.integers(0, 4, (6, 5)).astype(float)
    code[0] = 2.0
    for method in ("dr_grpo", "z_score"):
        a = adv_lib.group_advantages(rewards, method)
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, ref.advantages(rewards, method), atol=1e-6)
        assert np.all(a[0] == 0)
        ac = adv_lib.group_advantages(code, method)
        np.testing.assert_array_equal(adv_lib.group_filter(code, ac, "code"), ref.keep_groups(code, ac, "code"))
        assert not adv_lib.group_filter(code, ac, "code")[0]
    keep = adv_lib.group_filter(rewards, None, "math")
    np.testing.assert_array_equal(keep, ref.keep_groups(rewards, None, "math"))
    assert not keep[0] and keep[1] and not keep[2]
    # inclusive bounds: 1/5 and 4/5 kept, 0 and 1 dropped
    five = np.array([[1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [0] * 5, [1] * 5], float)
    assert adv_lib.group_filter(five, None, "math").tolist() == [True, True, False, False]
    assert adv_lib.group_filter(five, None, "none").all()
    with pytest.raises(ValueError):
        adv_lib.group_advantages(five, "grpo")


# --- batcher ----------------------------------------------------------------------------------------------------------

def test_make_batch_layout_padding_and_row_scale():
    p, r, sm = rollouts(6, n=5)
    pk = layout.pack_rollouts(p, r, PAD, step_maps=sm)
    rc = RLObjectiveConfig(objective="slim", block_size=4)
    rows = build_rows(rc, pk, MASK, np.random.default_rng(0))
    adv = np.arange(5, dtype=np.float32) - 2
    mb = 4 if len(rows) % 4 else 5
    b = make_batch(pk, rows, adv, minibatch=mb)
    R, real = b["input_ids"].shape[0], len(rows)
    assert R % mb == 0 and 0 < R - real < mb  # a partial last minibatch
    l0, l1 = pk.l0, pk.l1
    assert b["input_ids"].shape == (R, l0 + 2 * l1) and b["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(b["input_ids"][:real, :l0], pk.prompt[rows.rollout])
    np.testing.assert_array_equal(b["input_ids"][:real, l0:l0 + l1], pk.response[rows.rollout])
    np.testing.assert_array_equal(b["input_ids"][:real, l0 + l1:], rows.noisy)
    np.testing.assert_array_equal(b["positions"], ref.positions(b["prompt_valid"], l1))
    np.testing.assert_array_equal(b["adv"][:real], adv[rows.rollout])
    assert np.all(b["weight"][real:] == 0) and np.all(b["row_scale"][real:] == 0) and np.all(b["rollout"][real:] == -1)
    assert not b["targets"][real:].any() and b["logp_old"].shape == (R, l1)
    for part in split_minibatches(b, mb):  # row_scale sums to 1 over each minibatch's real rows
        assert abs(part["row_scale"].sum() - 1) < 1e-6
        n_real = (part["rollout"] >= 0).sum()
        np.testing.assert_allclose(part["row_scale"][:n_real], 1 / n_real)
    empty = make_batch(pk, masking.Rows(np.zeros(0, np.int32), np.zeros((0, l1), np.int32),
                                        np.zeros((0, l1), bool), np.zeros(0, np.float32)), adv, 4)
    assert empty["input_ids"].shape == (0, l0 + 2 * l1)


def test_build_rows_dispatch_and_reproducibility():
    p, r, sm = rollouts(8, n=4)
    pk = layout.pack_rollouts(p, r, PAD, step_maps=sm)
    for obj in ("slim", "random", "coupled", "tracerl"):
        rc = RLObjectiveConfig(objective=obj, block_size=4)
        a = build_rows(rc, pk, MASK, np.random.default_rng(11))
        b = build_rows(rc, pk, MASK, np.random.default_rng(11))
        assert as_rows(a) == as_rows(b) and len(a) > 0
    assert len(build_rows(RLObjectiveConfig(objective="slim", num_quadrature_points=5, block_size=4), pk, MASK,
                          np.random.default_rng(0))) <= 20
    with pytest.raises(ValueError, match="objective"):
        RLObjectiveConfig(objective="grpo")
    assert RLObjectiveConfig().advantage_method == "dr_grpo"
    assert RLObjectiveConfig(objective="tracerl").advantage_method == "z_score"
    assert RLObjectiveConfig(objective="tracerl", level="block").loss_level == "token"


def test_prompt_width_buckets():
    """The step's prompt width: >= the longest prompt, a multiple of K, less than 1/4 + K extra, and few distinct
    widths over the whole range the recipes allow (784 tokens), so the per-shape programs compile a bounded number
    of times."""
    for k in (1, 4, 12, 16):
        widths = [layout.prompt_width(w, k) for w in range(1, 785)]
        for w, got in zip(range(1, 785), widths):
            assert got >= w and got % k == 0, (w, k, got)
            assert got < 1.25 * (w + k), (w, k, got)
        assert widths == sorted(widths)
        assert len(set(widths)) <= 40, (k, len(set(widths)))  # K = 1: 35; K = 4: 27
    assert layout.prompt_width(12, 4) == 12 and layout.prompt_width(5, 4) == 8 and layout.prompt_width(0, 4) == 0
    assert layout.prompt_width(200, 4) == 224 and layout.prompt_width(784, 16) == 896
