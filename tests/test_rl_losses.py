"""RL losses (sequence / token / block levels, k1 / k2 / k3 KL) against the float64 NumPy re-statement of the spec:
values, gradients w.r.t. log pi (finite differences of the re-statement), clipped and unclipped cases, the metrics'
counters; the RL forward (rl_token_logprobs) against a direct dense forward of the same rows with the re-stated mask
on a tiny SDAR model; the objectives under jit(value_and_grad), dummy rows never changing loss or gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import ModelConfig
from dlmjax.model import transformer as M
from dlmjax.rl import layout, losses
from dlmjax.rl.batch import build_rows, make_batch
from dlmjax.rl.config import RLObjectiveConfig
from dlmjax.rl.objectives import loss_from_logprobs, make_rl_objective, rl_metrics, rl_token_logprobs
from tests.reference import np_rl as ref

R, L1, K = 7, 10, 4
V, PAD = 48, 0
CFG = ModelConfig(family="sdar", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, qk_norm=True, attention="block_causal",
                  block_size=K, mask_token_id=V - 1, eos_token_id=1, pad_token_id=PAD)


def loss_inputs(seed, spread):
    """Fixed random rows: ~half targets (row 1 has none), one dummy row (row_scale 0), mixed-sign advantages."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (R, L1))
    targets = rng.random((R, L1)) < 0.5
    targets[1] = False
    targets[0, :3] = True
    logp_old = logp + rng.normal(0, spread, (R, L1))
    adv = rng.normal(0, 1, R)
    weight = rng.uniform(0.2, 0.5, R)
    scale = np.full(R, 1 / (R - 1))
    scale[-1] = 0.0
    weight[-1] = 0.0
    return logp, logp_old, targets, adv, weight, scale


def run_jax(level, logp, logp_old, targets, adv, weight, scale, kl="k3", weighted=True):
    blocks = jnp.asarray(np.arange(L1)[None].repeat(R, 0) // K)

    def f(lp):
        a = (lp, jnp.asarray(logp_old, jnp.float32), jnp.asarray(targets), jnp.asarray(adv, jnp.float32),
             jnp.asarray(weight, jnp.float32), jnp.asarray(scale, jnp.float32))
        if level == "sequence":
            return losses.sequence_loss(*a, 0.1, 0.1, 0.01, kl)
        if level == "token":
            return losses.token_loss(*a, 0.2, 0.01, kl, weighted)
        return losses.block_loss(*a, blocks, (L1 - 1) // K + 1, 0.1, 0.1, 0.01, kl)

    (loss, sums), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    return float(loss), {k: float(v) for k, v in sums.items()}, np.asarray(g)


def run_ref(level, logp, logp_old, targets, adv, weight, scale, kl="k3", weighted=True):
    blocks = np.arange(L1)[None].repeat(R, 0) // K
    return ref.row_losses(logp, logp_old, targets, adv, weight, scale, level, L1, kl=kl, weighted=weighted,
                          blocks=blocks)


def fd_grad(level, logp, *rest, **kw):
    g = np.zeros_like(logp)
    h = 1e-6
    for i in range(R):
        for t in range(L1):
            up, dn = logp.copy(), logp.copy()
            up[i, t] += h
            dn[i, t] -= h
            g[i, t] = (run_ref(level, up, *rest, **kw)[0] - run_ref(level, dn, *rest, **kw)[0]) / (2 * h)
    return g


@pytest.mark.parametrize("level,weighted", [("sequence", True), ("token", True), ("token", False), ("block", True)])
@pytest.mark.parametrize("spread", [0.02, 0.6, 14.0])  # unclipped / clipped / past the +-10 exponent clamp
def test_loss_value_gradient_and_counters_match_reference(level, weighted, spread):
    x = loss_inputs(int(spread * 100) + len(level), spread)
    logp, logp_old, targets, adv, weight, scale = x
    loss, sums, g = run_jax(level, *x, weighted=weighted)
    want, pieces = run_ref(level, *x, weighted=weighted)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-7)
    gw = fd_grad(level, *x, weighted=weighted)
    np.testing.assert_allclose(g, gw, rtol=1e-3, atol=2e-6)
    assert np.all(g[~targets] == 0) and np.all(g[-1] == 0)  # off-target and dummy rows carry no gradient
    real = scale > 0
    np.testing.assert_allclose(sums["kl_sum"], sum(p[1] for p, r in zip(pieces, real) if r), rtol=2e-5, atol=1e-8)
    assert sums["n_rows"] == real.sum() and sums["n_targets"] == targets[real].sum()
    np.testing.assert_allclose(sums["policy"] + sums["kl_term"], loss, rtol=1e-6)
    d = np.where(targets, logp - logp_old, 0.0)
    if level == "sequence":
        s = np.exp(np.clip(d.sum(-1) / np.maximum(targets.sum(-1), 1), -10, 10))[real]
        clipped = ((s < 0.9) | (s > 1.1)).sum()
        assert sums["clip_total"] == real.sum()
    elif level == "token":
        rho = np.exp(np.clip(d, -10, 10))[real][targets[real]]
        clipped = (np.abs(rho - np.clip(rho, 0.8, 1.2)) > 1e-8).sum()
        assert sums["clip_total"] == targets[real].sum()
    else:
        clipped = 0
        for i in np.flatnonzero(real):
            for b in set(np.flatnonzero(targets[i]) // K):
                sel = targets[i] & (np.arange(L1) // K == b)
                r = np.exp(np.clip(d[i][sel].mean(), -10, 10))
                clipped += (r < 0.9) | (r > 1.1)
    assert sums["clip_count"] == clipped
    assert (clipped > 0) == (spread > 0.1)  # the two cases really are unclipped / clipped


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_kl_estimators(kl):
    x = loss_inputs(3, 0.3)
    loss, sums, g = run_jax("sequence", *x, kl=kl)
    want, _ = run_ref("sequence", *x, kl=kl)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(g, fd_grad("sequence", *x, kl=kl), rtol=1e-3, atol=2e-6)
    # KL normalised by L1, not by the target count: k3 of one target with d = 0.5 over L1 = 10
    d = jnp.zeros((1, L1)).at[0, 0].set(0.5)
    tg = jnp.zeros((1, L1), bool).at[0, 0].set(True)
    k = {"k1": 0.5, "k2": 0.125, "k3": np.exp(-0.5) - 1 + 0.5}[kl]
    np.testing.assert_allclose(float(losses.kl_rows(d, tg, kl)[0]), k / L1, rtol=1e-6)


def test_on_policy_ratio_is_one():
    """logp_old = logp: s = rho = 1, nothing clipped, KL 0, loss = -sum row_scale w A (sequence) and
    -sum row_scale |T| A / L1 (token)."""
    logp, _, targets, adv, weight, scale = loss_inputs(5, 0.0)
    loss, sums, _ = run_jax("sequence", logp, logp, targets, adv, weight, scale)
    np.testing.assert_allclose(loss, -(scale * weight * adv).sum(), rtol=1e-5)
    assert sums["clip_count"] == 0 and abs(sums["kl_sum"]) < 1e-7
    np.testing.assert_allclose(sums["ratio_sum"] / sums["ratio_count"], 1.0, rtol=1e-6)
    loss, _, _ = run_jax("token", logp, logp, targets, adv, weight, scale, weighted=False)
    np.testing.assert_allclose(loss, -(scale * targets.sum(-1) * adv).sum() / L1, rtol=1e-5)


# --- through the model ------------------------------------------------------------------------------------------------

def packed(seed, n=4):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, V - 1, rng.integers(2, 8)) for _ in range(n)]
    resps = [rng.integers(2, V - 1, rng.integers(3, 11)) for _ in range(n)]
    resps[0] = rng.integers(2, V - 1, 10)
    steps = [np.sort(rng.integers(1, 6, len(r))) for r in resps]
    return layout.pack_rollouts(prompts, resps, PAD, step_maps=steps)


@pytest.fixture(scope="module")
def params():
    return M.init_params(CFG, jax.random.key(0), std=0.2)


def dense_logp(params, b, align):
    """log softmax (float64) of a direct full forward of the rows with the re-stated mask, at the noisy positions."""
    pv = b["prompt_valid"]
    l0, l1 = pv.shape[1], b["targets"].shape[1]
    mask = ref.attention_mask(l0, l1, K, pv, align)
    pos = ref.positions(pv, l1)
    logits = np.asarray(M.forward(CFG, params, jnp.asarray(b["input_ids"]), jnp.asarray(pos), jnp.asarray(mask)),
                        np.float64)[:, l0 + l1:]
    lsm = logits - logits.max(-1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
    return np.take_along_axis(lsm, b["input_ids"][:, l0:l0 + l1, None], -1)[..., 0]


@pytest.mark.parametrize("align,head_rows", [("response", 5), ("response", 0), ("absolute", 7)])
def test_rl_token_logprobs_equals_direct_forward(params, align, head_rows):
    pk = packed(1)
    rc = RLObjectiveConfig(objective="slim", block_size=K, block_align=align)
    rows = build_rows(rc, pk, CFG.mask_token_id, np.random.default_rng(0))
    b = make_batch(pk, rows, np.ones(pk.n), 4)
    lp = np.asarray(jax.jit(lambda p, bb: rl_token_logprobs(CFG, p, bb, K, head_rows, align))(params, b))
    want = dense_logp(params, b, align)
    t = b["targets"]
    assert t.sum() > 10 and np.all(lp[~t] == 0)
    np.testing.assert_allclose(lp[t], want[t], rtol=1e-4, atol=1e-5)


def test_noisy_block_sees_only_its_prefix(params):
    """Hidden states of noisy block j do not change when the clean blocks >= j or the other noisy blocks change,
    and do change with the clean blocks < j (the mask really isolates blocks inside the model)."""
    pk = packed(2)
    b = make_batch(pk, build_rows(RLObjectiveConfig(objective="random", block_size=K), pk, CFG.mask_token_id,
                                  np.random.default_rng(0)), np.ones(pk.n), 4)
    l0, l1 = pk.l0, pk.l1
    mask = layout.extended_attention_mask(l0, l1, K, b["prompt_valid"])
    hs = lambda ids: np.asarray(M.hidden_states(CFG, params, jnp.asarray(ids), jnp.asarray(b["positions"]), mask)[0])
    h0 = hs(b["input_ids"])
    j = slice(l0 + l1 + K, l0 + l1 + 2 * K)  # noisy block 1
    ids = b["input_ids"].copy()
    ids[:, l0 + K:l0 + l1] = 5  # clean blocks >= 1
    ids[:, l0 + l1:l0 + l1 + K] = 6  # noisy block 0
    ids[:, l0 + l1 + 2 * K:] = 7  # noisy blocks >= 2
    np.testing.assert_allclose(hs(ids)[:, j], h0[:, j], atol=1e-5)
    ids = b["input_ids"].copy()
    ids[:, l0:l0 + K] = 5  # clean block 0
    assert np.abs(hs(ids)[:, j] - h0[:, j]).max() > 1e-3


@pytest.mark.parametrize("objective,level", [("slim", "sequence"), ("slim", "token"), ("slim", "block"),
                                             ("tracerl", "sequence"), ("random", "sequence"),
                                             ("coupled", "sequence")])
def test_objective_loss_grad_and_dummy_rows(params, objective, level):
    """loss_fn under jit(value_and_grad) equals the re-statement on the objective's own log-probs; a batch padded
    with dummy rows gives the same loss and gradient as the unpadded one; metrics are what the counters say."""
    pk = packed(3)
    rc = RLObjectiveConfig(objective=objective, level=level, block_size=K, head_rows=6)
    obj = make_rl_objective(CFG, rc)
    assert obj.reduce == "sum" and set(obj.batch_keys) <= {"input_ids", "positions", "prompt_valid", "targets",
                                                           "resp_len", "adv", "weight", "row_scale", "logp_old"}
    rows = build_rows(rc, pk, CFG.mask_token_id, np.random.default_rng(4))
    n = len(rows)
    adv = np.array([1.0, -0.5, 0.25, -0.75])
    big = make_batch(pk, rows, adv, n + 3)  # 3 dummy rows
    exact = make_batch(pk, rows, adv, n)
    rng = np.random.default_rng(0)
    old = np.asarray(obj.logprobs(params, exact))
    for bb in (big, exact):
        bb["logp_old"][:n] = np.where(bb["targets"][:n], old + rng.normal(0, 0.2, old.shape), 0).astype(np.float32)
        rng = np.random.default_rng(0)
    vg = jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))
    (l_big, s_big), g_big = vg(params, big)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_big)) > 0
    lp = np.asarray(obj.logprobs(params, big), np.float64)
    blocks = np.arange(pk.l1)[None].repeat(len(lp), 0) // K
    want, _ = ref.row_losses(lp, big["logp_old"], big["targets"], big["adv"], big["weight"], big["row_scale"],
                             rc.loss_level, pk.l1, kl="k3", weighted=objective == "slim", blocks=blocks)
    np.testing.assert_allclose(float(l_big), want, rtol=1e-4, atol=1e-7)
    if level == "sequence" and objective in ("slim", "tracerl"):  # one more compile: the unpadded batch
        (l_ex, _), g_ex = vg(params, exact)
        np.testing.assert_allclose(float(l_big), float(l_ex), rtol=1e-5)
        jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-7),
                     g_big, g_ex)
    m = {k: float(v) for k, v in rl_metrics(s_big).items()}
    assert m["rows"] == n and m["targets"] == exact["targets"].sum()
    np.testing.assert_allclose(m["mask_ratio"], exact["targets"].sum() / exact["resp_len"].sum(), rtol=1e-6)
    assert 0 <= m["clip_frac"] <= 1 and m["kl"] > 0


def test_loss_from_logprobs_block_alignment_changes_blocks():
    """block level under absolute alignment groups targets by (P mod K + i) // K: a row whose prompt length is not a
    multiple of K gets a different loss than under response alignment."""
    rng = np.random.default_rng(0)
    l0, l1 = 3, 8
    logp = jnp.asarray(-rng.uniform(0.1, 2, (1, l1)), jnp.float32)
    b = {"logp_old": np.asarray(logp) + rng.normal(0, 0.05, (1, l1)).astype(np.float32),
         "targets": np.ones((1, l1), bool), "adv": np.ones(1, np.float32), "weight": np.ones(1, np.float32),
         "row_scale": np.ones(1, np.float32), "resp_len": np.full(1, l1, np.int32),
         "prompt_valid": np.array([[False, True, True]])}
    rc = RLObjectiveConfig(level="block", block_size=4)
    l_resp, _ = loss_from_logprobs(rc, logp, b)
    l_abs, _ = loss_from_logprobs(rc.replace(block_align="absolute"), logp, b)
    want, _ = ref.row_losses(np.asarray(logp), b["logp_old"], b["targets"], b["adv"], b["weight"], b["row_scale"],
                             "block", l1, blocks=[(2 + np.arange(l1)) // 4])
    np.testing.assert_allclose(float(l_abs), want, rtol=1e-5)
    assert abs(float(l_abs) - float(l_resp)) > 1e-6
