"""TraceRL's diffusion value model (spec §2.6, dlmjax/rl/value.py) against float64 NumPy re-statements written from
the spec: the shrunk step ids the rows carry, the step-level returns / advantages mapped to tokens (general gamma,
lambda; the defaults give R_j = the sequence reward and A_j = R - V_j), the clipped value loss (values and gradients
w.r.t. V, the head and a backbone leaf; clipped and unclipped), the zero-initialised head (V = 0, so the first step's
per-token advantage is the sequence advantage), the policy's per-token advantage path; the value phase of an outer
step; a tiny RL run with the value model that resumes exactly; the launcher's flags."""

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import ModelConfig
from dlmjax.model import transformer as M
from dlmjax.rl import layout, losses, slicing
from dlmjax.rl import value as value_lib
from dlmjax.rl.batch import build_rows, make_batch, split_minibatches
from dlmjax.rl.config import RLObjectiveConfig, ValueConfig
from dlmjax.rl.objectives import make_rl_objective
from tests.reference import np_rl as ref

K, VOCAB, PAD = 4, 48, 0
MASK = VOCAB - 1
CFG = ModelConfig(family="sdar", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, qk_norm=True,
                  attention="block_causal", block_size=K, mask_token_id=MASK, eos_token_id=1, pad_token_id=PAD)


def trace_batch(seed, shrink=1, n=5, minibatch=4, partial=True):
    """Random rollouts (unsorted step maps with repeats, one response of 11 tokens, some short) -> TraceRL rows -> the
    padded batch (partial: the minibatch size is bumped so the last one is partial and dummy rows exist). Returns
    (packed, batch, step maps, minibatch)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, VOCAB - 1, rng.integers(2, 7)) for _ in range(n)]
    resps = [rng.integers(2, VOCAB - 1, rng.integers(1, 12)) for _ in range(n)]
    resps[0] = rng.integers(2, VOCAB - 1, 11)
    steps = [rng.integers(1, 9, len(r)) for r in resps]
    pk = layout.pack_rollouts(prompts, resps, PAD, step_maps=steps)
    rc = RLObjectiveConfig(objective="tracerl", block_size=K, shrink=shrink)
    rows = build_rows(rc, pk, MASK, rng)
    if partial and len(rows) % minibatch == 0:
        minibatch += 1
    return pk, make_batch(pk, rows, rng.normal(size=n).astype(np.float32), minibatch), steps, minibatch


# --- the NumPy re-statement of §2.3 step 1 and §2.6 ----------------------------------------------------------------

def ref_shrunk(step_map, l1, shrink):
    """The rollout's step map padded to L1 (pads: max + 1), each response K-block collapsed (dLLM-RL's
    collapse_k_unique, tests/reference/np_rl.py)."""
    sm = list(step_map[:l1]) + [max(step_map) + 1] * (l1 - min(len(step_map), l1))
    for b in range(0, l1, K):
        sm[b:b + K] = ref.collapse(sm[b:b + K], shrink)
    return sm


def ref_returns_advantages(rollout, targets, values, reward, shrunk, gamma, lam):
    """§2.6 literally, rollout by rollout: the rollout's tokens are the targets of its rows; steps t = 1..S in
    increasing (shrunk) step id; the sequence reward on the last step's tokens; r_t*, V_t* = means over the step's
    tokens; R_t* = r_t* + g R_{t+1}*; d_t* = r_t* - V_t* + g V_{t+1}*; A_t* = d_t* + g l A_{t+1}* (0 beyond S);
    R_j = r_j + g R_{t(j)+1}*; A_j = (r_j - V_j) + g V_{t(j)+1}* + g l A_{t(j)+1}*."""
    R = np.zeros(targets.shape)
    A = np.zeros(targets.shape)
    for b in sorted(set(int(x) for x in rollout if x >= 0)):
        toks = [(r, t) for r in range(len(rollout)) if rollout[r] == b for t in range(targets.shape[1])
                if targets[r, t]]
        step = {tok: shrunk[b][tok[1]] for tok in toks}
        S = sorted(set(step.values()))
        rj = {tok: float(reward[b]) if step[tok] == S[-1] else 0.0 for tok in toks}
        rs = [np.mean([rj[tok] for tok in toks if step[tok] == s]) for s in S] + [0.0]
        vs = [np.mean([float(values[tok]) for tok in toks if step[tok] == s]) for s in S] + [0.0]
        Rs, As = [0.0] * (len(S) + 1), [0.0] * (len(S) + 1)
        for i in reversed(range(len(S))):
            Rs[i] = rs[i] + gamma * Rs[i + 1]
            As[i] = (rs[i] - vs[i] + gamma * vs[i + 1]) + gamma * lam * As[i + 1]
        for tok in toks:
            i = S.index(step[tok])
            R[tok] = rj[tok] + gamma * Rs[i + 1]
            A[tok] = (rj[tok] - float(values[tok])) + gamma * vs[i + 1] + gamma * lam * As[i + 1]
    return R, A


def ref_value_loss(v, v_old, ret, targets, row_scale, clip):
    """float64: sum_rows row_scale (1 / L1) sum_targets 1/2 max((V - R)^2, (V_old + clip(V - V_old) - R)^2); and the
    number of real targets whose clipped term is the larger."""
    l1 = targets.shape[1]
    total, n_clip = 0.0, 0
    for i in range(targets.shape[0]):
        row = 0.0
        for t in range(l1):
            if not targets[i, t]:
                continue
            vc = v_old[i, t] + min(max(v[i, t] - v_old[i, t], -clip), clip)
            lu, lc = (v[i, t] - ret[i, t]) ** 2, (vc - ret[i, t]) ** 2
            row += 0.5 * max(lu, lc)
            n_clip += int(lc > lu and row_scale[i] > 0)
        total += row_scale[i] * row / l1
    return total, n_clip


# --- step ids, returns and advantages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shrink", [1, 2, 3])
def test_rows_carry_the_shrunk_step_of_each_target(shrink):
    pk, b, steps, _ = trace_batch(1, shrink)
    real = b["rollout"] >= 0
    for r in np.flatnonzero(real):
        want = ref_shrunk(steps[b["rollout"][r]], pk.l1, shrink)
        np.testing.assert_array_equal(b["step_id"][r], np.where(b["targets"][r], want, -1))
    assert np.all(b["step_id"][~real] == -1)
    blocks = np.arange(pk.l1)[None].repeat(pk.n, 0) // K
    got = slicing.shrunk_step_ids(pk.step_map, blocks, shrink)
    assert got.tolist() == [ref_shrunk(s, pk.l1, shrink) for s in steps]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (1.0, 0.0), (0.5, 1.0), (0.0, 0.7)])
@pytest.mark.parametrize("shrink", [1, 2])
def test_returns_and_advantages_match_reference(gamma, lam, shrink):
    pk, b, steps, _ = trace_batch(2 + shrink, shrink)
    rng = np.random.default_rng(7)
    values = rng.normal(size=b["targets"].shape)
    values[~b["targets"]] = 100.0  # off-target values must never be read
    ret, adv = value_lib.returns_advantages(b["rollout"], b["targets"], b["step_id"], b["adv"], values, gamma, lam)
    reward = {int(r): float(a) for r, a in zip(b["rollout"], b["adv"]) if r >= 0}
    shrunk = {i: ref_shrunk(steps[i], pk.l1, shrink) for i in range(pk.n)}
    R, A = ref_returns_advantages(b["rollout"], b["targets"], values, reward, shrunk, gamma, lam)
    np.testing.assert_allclose(ret, R, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(adv, A, rtol=1e-6, atol=1e-6)
    assert np.all(ret[~b["targets"]] == 0) and np.all(adv[~b["targets"]] == 0)
    assert len(set(b["step_id"][b["targets"]].tolist())) > 3  # several steps per rollout: the recursion matters


def test_default_gamma_lambda_give_sequence_return_and_r_minus_v():
    """gamma = lam = 1: R_j = the sequence reward, A_j = R - V_j (the reference's own assertion)."""
    _, b, _, _ = trace_batch(4)
    values = np.random.default_rng(0).normal(size=b["targets"].shape)
    ret, adv = value_lib.returns_advantages(b["rollout"], b["targets"], b["step_id"], b["adv"], values)
    t = b["targets"]
    seq = np.broadcast_to(b["adv"][:, None], t.shape)
    np.testing.assert_allclose(ret[t], seq[t], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(adv[t], (seq - values)[t], rtol=1e-6, atol=1e-6)


def test_returns_and_advantages_worked_example():
    """One rollout, steps [1 1 2], V [0.1 0.3 0.5], reward 1, gamma = lam = 0.5: r* = (0, 1), V* = (0.2, 0.5),
    R* = (0.5, 1), A*_2 = 0.5, A*_1 = -0.2 + 0.25 + 0.125 = 0.175; tokens R = (0.5, 0.5, 1),
    A = (-0.1 + 0.25 + 0.125, -0.3 + 0.375, 1 - 0.5) = (0.275, 0.075, 0.5). Two rows (step 1, then step 2)."""
    targets = np.array([[1, 1, 0], [0, 0, 1]], bool)
    steps = np.array([[1, 1, -1], [-1, -1, 2]])
    values = np.array([[0.1, 0.3, 0.0], [0.0, 0.0, 0.5]])
    ret, adv = value_lib.returns_advantages(np.array([0, 0]), targets, steps, np.array([1.0, 1.0]), values, 0.5, 0.5)
    np.testing.assert_allclose(ret[targets], [0.5, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(adv[targets], [0.275, 0.075, 0.5], rtol=1e-6)
    assert value_lib.explained_variance(ret, values, targets) == pytest.approx(
        1 - np.var([0.4, 0.2, 0.5]) / np.var([0.5, 0.5, 1.0]))


# --- the clipped value loss -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spread", [0.05, 0.6])  # |V - V_old| < clip everywhere / often beyond it
def test_value_loss_and_gradient_match_reference(spread):
    rng = np.random.default_rng(int(spread * 100))
    r, l1 = 6, 9
    v = rng.normal(size=(r, l1))
    v_old = v + rng.uniform(-spread, spread, (r, l1))
    ret = rng.normal(size=(r, l1))
    targets = rng.random((r, l1)) < 0.6
    targets[0, :2] = True
    scale = np.full(r, 1 / (r - 1))
    scale[-1] = 0.0  # a dummy row
    f = lambda x: value_lib.value_loss(x, jnp.asarray(v_old, jnp.float32), jnp.asarray(ret, jnp.float32),  # noqa: E731
                                       jnp.asarray(targets), jnp.asarray(scale, jnp.float32), 0.2)
    (loss, sums), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(v, jnp.float32))
    want, n_clip = ref_value_loss(v, v_old, ret, targets, scale, 0.2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    gw = np.zeros_like(v)
    for i in range(r):
        for t in range(l1):
            up, dn = v.copy(), v.copy()
            up[i, t] += 1e-6
            dn[i, t] -= 1e-6
            gw[i, t] = (ref_value_loss(up, v_old, ret, targets, scale, 0.2)[0]
                        - ref_value_loss(dn, v_old, ret, targets, scale, 0.2)[0]) / 2e-6
    np.testing.assert_allclose(np.asarray(g), gw, rtol=1e-3, atol=1e-6)
    assert float(sums["clip_count"]) == n_clip and float(sums["n_targets"]) == targets[:-1].sum()
    assert (n_clip > 0) == (spread > 0.2)  # the two cases really are unclipped / clipped
    if n_clip:
        assert np.any((g == 0) & targets)  # a clipped target whose clipped term wins has no gradient


@pytest.fixture(scope="module")
def params():
    return jax.jit(M.init_params, static_argnums=(0, 2))(CFG, jax.random.key(0), 0.2)


RC = RLObjectiveConfig(objective="tracerl", block_size=K, head_rows=0)
VOBJ = value_lib.make_value_objective(CFG, RC, ValueConfig())
_value_vg = jax.jit(jax.value_and_grad(VOBJ.loss_fn, has_aux=True))  # one compile per batch shape, shared


@jax.jit
def _direct(vp, ids, pos, mask, ct):
    """A direct dense forward of the rows (re-stated mask and positions): noisy hidden states [R, L1, D], V = h . w,
    and the vjp of V w.r.t. the params with cotangent ct [R, L1]."""
    l1 = ct.shape[1]

    def v_of(p):
        h = M.hidden_states(CFG, p, ids, pos, mask)[0][:, -l1:]
        return jnp.einsum("rld,d->rl", h, p["value_head"]), h

    v, vjp, h = jax.vjp(v_of, vp, has_aux=True)
    return h, v, vjp(ct)[0]


@pytest.mark.parametrize("spread", [0.05, 0.6])
def test_value_objective_values_and_gradients_match_reference(params, spread):
    """The objective under jit(value_and_grad): loss = the re-statement on V from a direct forward; d/d head =
    sum_t dL/dV_t h_t; d/d a backbone leaf (layers.wq) = the vjp of the direct forward with the re-stated dL/dV."""
    _, b, _, _ = trace_batch(5)
    rng = np.random.default_rng(1)
    vp = {**value_lib.value_params(CFG, params),
          "value_head": jnp.asarray(rng.normal(0, 0.5, CFG.hidden_size), jnp.float32)}
    pv, t = b["prompt_valid"], b["targets"]
    l0, l1 = pv.shape[1], t.shape[1]
    args = (vp, jnp.asarray(b["input_ids"]), jnp.asarray(ref.positions(pv, l1)),
            jnp.asarray(ref.attention_mask(l0, l1, K, pv)))
    hn, v, _ = _direct(*args, jnp.zeros(t.shape, jnp.float32))
    hn, v = np.asarray(hn, np.float64), np.asarray(v, np.float64)
    b = {**b, "v_old": np.where(t, v + rng.uniform(-spread, spread, v.shape), 0).astype(np.float32),
         "ret": np.where(t, rng.normal(size=v.shape), 0).astype(np.float32)}
    (loss, sums), g = _value_vg(vp, b)
    want, n_clip = ref_value_loss(v, b["v_old"], b["ret"], t, b["row_scale"], 0.2)
    np.testing.assert_allclose(float(loss), want, rtol=2e-4)
    assert float(sums["clip_count"]) == n_clip and (n_clip > 0) == (spread > 0.2)
    dv = np.zeros_like(v)  # dL/dV of the re-statement (central differences, float64)
    for i, j in zip(*np.nonzero(t)):
        up, dn = v.copy(), v.copy()
        up[i, j] += 1e-6
        dn[i, j] -= 1e-6
        dv[i, j] = (ref_value_loss(up, b["v_old"], b["ret"], t, b["row_scale"], 0.2)[0]
                    - ref_value_loss(dn, b["v_old"], b["ret"], t, b["row_scale"], 0.2)[0]) / 2e-6
    np.testing.assert_allclose(np.asarray(g["value_head"]), np.einsum("rl,rld->d", dv, hn), rtol=2e-3, atol=1e-6)
    gw = _direct(*args, jnp.asarray(dv, jnp.float32))[2]["layers"]["wq"]
    assert float(jnp.abs(gw).max()) > 1e-4
    np.testing.assert_allclose(np.asarray(g["layers"]["wq"]), np.asarray(gw), rtol=2e-3, atol=2e-6)
    assert "lm_head" not in g and "lm_head" not in vp  # the value net never reads the LM head


def test_per_token_advantage_path_equals_per_row_for_a_constant_advantage():
    """The policy loss (and its gradient w.r.t. log pi) with A_j = the row's advantage on every token is the per-row
    loss: the first outer step of a run with the value model (V = 0) trains the policy as TraceRL without it."""
    from dlmjax.rl.objectives import loss_from_logprobs

    _, b, _, _ = trace_batch(6)
    rng = np.random.default_rng(2)
    logp = jnp.asarray(np.where(b["targets"], -rng.uniform(0.1, 3, b["targets"].shape), 0), jnp.float32)
    b = {**b, "logp_old": np.where(b["targets"], logp + rng.normal(0, 0.3, logp.shape), 0).astype(np.float32),
         "adv_tok": np.where(b["targets"], b["adv"][:, None], 0).astype(np.float32)}
    (l1, _), g1 = jax.value_and_grad(lambda x: loss_from_logprobs(RC, x, b, True), has_aux=True)(logp)
    (l2, _), g2 = jax.value_and_grad(lambda x: loss_from_logprobs(RC, x, b), has_aux=True)(logp)
    assert float(l1) == float(l2) != 0
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    per_token = make_rl_objective(CFG, RC, token_adv=True)
    assert "adv_tok" in per_token.batch_keys and "adv_tok" not in make_rl_objective(CFG, RC).batch_keys
    # a varying A_j: the objective's loss is the token loss of exactly that per-token advantage
    b["adv_tok"] = np.where(b["targets"], rng.normal(size=logp.shape), 0).astype(np.float32)
    want, _ = losses.token_loss(logp, jnp.asarray(b["logp_old"]), jnp.asarray(b["targets"]), jnp.asarray(b["adv_tok"]),
                                jnp.asarray(b["weight"]), jnp.asarray(b["row_scale"]))
    got = float(loss_from_logprobs(RC, logp, b, True)[0])
    assert got == pytest.approx(float(want), rel=1e-6) and got != pytest.approx(float(l2), rel=1e-3)


def test_rl_job_wires_the_value_model(params, tmp_path):
    """make_rl_job with run.value: the policy objective reads the per-token advantage, the job carries the value
    state (aux_init) and records the value settings for resume checks; without it none of that."""
    from dlmjax.decode.sdar import BlockDecodeConfig
    from dlmjax.rewards.registry import RewardConfig
    from dlmjax.rl.job import RLRunConfig, make_rl_job
    from dlmjax.train.config import OptimConfig, StepConfig
    from dlmjax.train.loop import LoopConfig

    run = RLRunConfig(loop=LoopConfig(workdir=str(tmp_path), steps=1), objective=RC,
                      rollout=BlockDecodeConfig(block_size=K, steps=K, max_new_tokens=8),
                      reward=RewardConfig(kind="exact", workers=0), optim=OptimConfig(), step=StepConfig(),
                      prompts_per_step=2, group_size=2, value=ValueConfig(gamma=0.9))
    samples = [{"prompt_ids": [3, 4 + i], "answer": "x"} for i in range(4)]
    job, close = make_rl_job(run, CFG, samples, str, PAD, reward_fn=lambda *a: None, value_params=params)
    assert "adv_tok" in job.objective.batch_keys and job.aux_init is not None
    assert job.meta["value"]["gamma"] == 0.9 and "value" in job.resume_keys
    off, _ = make_rl_job(dataclasses.replace(run, value=None), CFG, samples, str, PAD, reward_fn=lambda *a: None)
    assert "adv_tok" not in off.objective.batch_keys and off.aux_init is None and off.meta["value"] is None
    with pytest.raises(ValueError, match="tracerl"):
        dataclasses.replace(run, objective=RLObjectiveConfig(objective="slim", block_size=K))


def test_token_loss_with_per_token_advantage_matches_reference():
    """TraceRL's token loss with A_j per token: (1 / L1) sum_targets min(rho A_j, clip(rho) A_j) + k3 KL, rows by
    row_scale; value and gradient w.r.t. log pi against the float64 re-statement (central differences)."""
    rng = np.random.default_rng(3)
    r, l1 = 5, 8
    logp = -rng.uniform(0.1, 3.0, (r, l1))
    old = logp + rng.normal(0, 0.5, (r, l1))
    targets = rng.random((r, l1)) < 0.6
    adv = rng.normal(size=(r, l1))
    scale = np.array([0.25, 0.25, 0.25, 0.25, 0.0])

    def ref_loss(lp):
        total = 0.0
        for i in range(r):
            g = kl = 0.0
            for t in np.flatnonzero(targets[i]):
                d = lp[i, t] - old[i, t]
                rho = np.exp(np.clip(d, -10, 10))
                g += min(rho * adv[i, t], np.clip(rho, 0.8, 1.2) * adv[i, t])
                kl += np.exp(np.clip(-d, -10, 10)) - 1 + d
            total += scale[i] * (-g / l1 + 0.01 * kl / l1)
        return total

    f = lambda x: losses.token_loss(x, jnp.asarray(old, jnp.float32), jnp.asarray(targets),  # noqa: E731
                                    jnp.asarray(adv, jnp.float32), jnp.ones(r), jnp.asarray(scale, jnp.float32))
    (loss, sums), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(float(loss), ref_loss(logp), rtol=2e-5)
    gw = np.zeros_like(logp)
    for i in range(r):
        for t in range(l1):
            up, dn = logp.copy(), logp.copy()
            up[i, t] += 1e-6
            dn[i, t] -= 1e-6
            gw[i, t] = (ref_loss(up) - ref_loss(dn)) / 2e-6
    np.testing.assert_allclose(np.asarray(g), gw, rtol=1e-3, atol=2e-6)
    assert 0 < float(sums["clip_count"]) < float(sums["clip_total"])
    with pytest.raises(ValueError, match="token-level"):
        make_rl_objective(CFG, RLObjectiveConfig(objective="slim"), token_adv=True)


# --- the value phase of an outer step ---------------------------------------------------------------------------------

def test_value_phase_updates_resets_and_skips(params):
    """ValueJob.phase on a fake loop context (defaults gamma = lam = 1, so A_j = R - V_old_j): the zero head gives
    V = 0, i.e. the sequence advantage on every token; the advantages come from this step's V_old, before the update;
    one value step per minibatch; train_every skips steps; reset restarts AdamW and its step counter."""
    from types import SimpleNamespace

    from dlmjax import sharding as mesh_lib
    from dlmjax.train.config import MeshConfig, OptimConfig, StepConfig

    _, b, _, mb = trace_batch(8)
    job = value_lib.make_value_job(ValueConfig(lr=1e-2, train_every=2), CFG, RC, StepConfig(global_batch=mb),
                                   OptimConfig(lr=1e-3), params)
    mesh = mesh_lib.make_mesh(MeshConfig())
    aux, aux_sh = job.init(mesh)
    ptr = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()  # noqa: E731
    assert ptr(aux["params"]["layers"]["wq"]) != ptr(params["layers"]["wq"])  # a private copy (donated each step)
    np.testing.assert_array_equal(np.asarray(aux["params"]["layers"]["wq"]), np.asarray(params["layers"]["wq"]))
    assert aux["params"]["value_head"].shape == (CFG.hidden_size,) and not np.asarray(aux["params"]["value_head"]).any()
    assert set(aux["params"]) == {"embed", "layers", "final_norm", "value_head"}
    ctx = SimpleNamespace(mesh=mesh, aux_sh=aux_sh)
    minis = split_minibatches(b, mb)
    t = b["targets"]
    seq = np.where(t, b["adv"][:, None], 0)
    adv_of = lambda out: np.concatenate([o["adv_tok"] for o in out])  # noqa: E731

    aux, out, m = job.phase(ctx, aux, minis, 0)  # outer step 1: 1 % 2 != 0, no update; V = 0
    np.testing.assert_array_equal(adv_of(out), seq)
    assert m["value_updates"] == 0 and int(aux["step"]) == 0 and m["value_mean"] == 0
    assert all(set(o) == set(x) | {"adv_tok"} for o, x in zip(out, minis))
    aux, out, m = job.phase(ctx, aux, minis, 1)  # outer step 2: V_old still 0, then one update per minibatch
    np.testing.assert_array_equal(adv_of(out), seq)
    assert m["value_updates"] == len(minis) == int(aux["step"]) and m["value_loss"] > 0
    v_now = np.concatenate([np.asarray(jax.jit(job.objective.logprobs)(aux["params"], x)) for x in minis])
    aux, out, m = job.phase(ctx, aux, minis, 2)  # outer step 3: skipped; A = R - V of the updated model
    adv2 = adv_of(out)
    np.testing.assert_allclose(adv2, np.where(t, seq - v_now, 0), rtol=1e-5, atol=1e-6)
    assert m["value_updates"] == 0 and m["value_mean"] == pytest.approx(v_now[t & (b["rollout"] >= 0)[:, None]].mean())
    aux, out, m = job.phase(ctx, aux, minis, 3, reset=True)  # outer step 4: same V_old, then AdamW restarted
    np.testing.assert_array_equal(adv_of(out), adv2)
    assert m["value_updates"] == len(minis) == int(aux["step"])  # the reset zeroed the step counter first


def _mesh_worker():
    """Run in a subprocess by test_value_phase_on_8_devices_equals_one (or by hand:
        JAX_NUM_CPU_DEVICES=8 JAX_PLATFORMS=cpu python -c \
            "from tests.test_rl_value import _mesh_worker; _mesh_worker()"):
    a value phase (V_old of a random head -> advantages -> one update per minibatch, 2 micro-batches each) on a
    2x2x2 (data, fsdp, tensor) mesh and on one device; prints one JSON line comparing them (expect loss8 == loss1 to
    ~1e-6 relative, adv_diff / adv_max and param_rel_diff ~1e-6 or less)."""
    from types import SimpleNamespace

    from dlmjax import sharding as mesh_lib
    from dlmjax.train.config import MeshConfig, OptimConfig, StepConfig

    assert jax.device_count() == 8, jax.device_count()
    params = M.init_params(CFG, jax.random.key(0), std=0.2)
    _, b, _, mb = trace_batch(9, minibatch=8, partial=False)
    minis = split_minibatches(b, mb)
    got = {}
    for name, devices, mc in (("one", jax.devices()[:1], MeshConfig()),
                              ("mesh", jax.devices(), MeshConfig(data=2, fsdp=2, tensor=2))):
        mesh = mesh_lib.make_mesh(mc, devices)
        # a large Adam eps keeps updates proportional to the gradient (as tests/workers/rl_mesh.py)
        job = value_lib.make_value_job(ValueConfig(lr=1e-2), CFG, RC, StepConfig(global_batch=mb, grad_accum=2),
                                       OptimConfig(lr=1e-3, eps=1e-3), params, mesh)
        aux, sh = job.init(mesh)
        head = jax.device_put(np.random.default_rng(0).normal(0, 0.5, CFG.hidden_size).astype(np.float32),
                              sh["params"]["value_head"])
        aux = {**aux, "params": {**aux["params"], "value_head": head}}  # V_old != 0
        ctx = SimpleNamespace(mesh=mesh, aux_sh=sh)
        aux, out, m = job.phase(ctx, aux, minis, 0)
        got[name] = (m["value_loss"], np.concatenate([o["adv_tok"] for o in out]),
                     jax.tree.map(np.asarray, aux["params"]))
    (l1, a1, p1), (l8, a8, p8) = got["one"], got["mesh"]
    dp = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
             for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print(json.dumps({"loss1": l1, "loss8": l8, "adv_diff": float(np.abs(a1 - a8).max()),
                      "adv_max": float(np.abs(a1).max()), "param_rel_diff": dp, "minibatches": len(minis)}))


@pytest.mark.slow
def test_value_phase_on_8_devices_equals_one():
    """The value phase (V_old pass, per-token advantages, value updates with micro-batches) on a 2x2x2 mesh of 8 fake
    CPU devices equals one device (~20 CPU-s in a subprocess: the parent's device count is fixed at start-up)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
    r = subprocess.run([sys.executable, "-c", "from tests.test_rl_value import _mesh_worker; _mesh_worker()"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["minibatches"] >= 2
    assert abs(out["loss8"] - out["loss1"]) <= 1e-5 * abs(out["loss1"]) and out["loss1"] > 0, out
    assert out["adv_diff"] <= 1e-5 * out["adv_max"] and out["adv_max"] > 0, out
    assert out["param_rel_diff"] <= 1e-5, out


# --- a tiny RL run with the value model ------------------------------------------------------------------------------

def _rl_value_run(workdir, steps=4, resume=True):
    from dlmjax.decode.sdar import BlockDecodeConfig
    from dlmjax.rewards.registry import RewardConfig
    from dlmjax.rl.job import RLRunConfig, run_rl
    from dlmjax.train.config import OptimConfig, StepConfig
    from dlmjax.train.loop import LoopConfig
    from tests.test_rl_job import _even_reward

    rng = np.random.default_rng(0)
    samples = [{"prompt_ids": rng.integers(2, MASK, 4).tolist(), "answer": "x"} for _ in range(6)]
    rc = RLObjectiveConfig(objective="tracerl", block_size=K, group_filter="none", head_rows=0)
    run = RLRunConfig(  # fixed prompt and response lengths: one compile of each step for the whole run
        loop=LoopConfig(workdir=str(workdir), steps=steps, log_every=1, save_every=1, keep=steps, resume=resume,
                        tensorboard=False, export=False, async_save=False),
        objective=rc, rollout=BlockDecodeConfig(block_size=K, steps=K, max_new_tokens=8, rule="dynamic"),
        reward=RewardConfig(kind="exact", workers=0), optim=OptimConfig(lr=1e-3, total_steps=100, schedule="constant"),
        step=StepConfig(global_batch=8, seed=3), prompts_per_step=2, group_size=3,
        value=ValueConfig(lr=1e-2, train_every=2))
    return run_rl(run, CFG, M.init_params(CFG, jax.random.key(0), std=0.2), samples,
                  lambda ids: " ".join(map(str, ids)), PAD, log=lambda *_: None, reward_fn=_even_reward)


@contextlib.contextmanager
def _persistent_compile_cache(directory):
    """JAX's persistent compilation cache in `directory` for the block only (then the process's settings again), so
    the resumed run loads the straight run's executables instead of compiling them again (~15 CPU-s). Executables
    only: the resumed state still comes from the checkpoint."""
    from jax._src import compilation_cache

    new = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0.0,
           "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {k: getattr(jax.config, k) for k in new}
    try:
        for k, v in new.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


@pytest.mark.slow
def test_rl_run_with_value_model_resumes_exactly(tmp_path):
    """4 outer steps straight == the same run resumed from its step-2 checkpoint (policy, value params, both
    optimizer states, metrics); the value model trains on every 2nd outer step and starts at V = 0."""
    with _persistent_compile_cache(tmp_path / "xla"):
        straight = _rl_value_run(tmp_path / "a")
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        for s in (3, 4):  # as if the run had stopped after step 2
            shutil.rmtree(tmp_path / "b" / "checkpoints" / str(s))
        resumed = _rl_value_run(tmp_path / "b")
    assert resumed["history"][0]["step"] == 3
    h = straight["history"]
    keys = ("reward", "rows", "loss", "kl", "value_loss", "value_mean", "value_explained_var", "value_clip_frac")
    assert [[x[k] for k in keys] for x in h[2:]] == [[x[k] for k in keys] for x in resumed["history"]]
    a, b = straight["state"], resumed["state"]
    assert set(a) == {"step", "params", "opt_state", "aux"} and set(a["aux"]) == {"step", "params", "opt_state"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [x["value_updates"] for x in h] == [0, h[1]["updates"], 0, h[3]["updates"]] and h[1]["updates"] > 0
    assert h[0]["value_mean"] == h[1]["value_mean"] == 0 and h[0]["value_explained_var"] == 0  # zero head
    assert h[2]["value_mean"] != 0 and h[1]["value_loss"] > 0
    assert int(a["aux"]["step"]) == h[1]["updates"] + h[3]["updates"]
    assert int(a["step"]) == sum(x["updates"] for x in h)
    assert float(np.abs(np.asarray(a["aux"]["params"]["value_head"])).max()) > 0


# --- the launcher -----------------------------------------------------------------------------------------------------

_PARSE = r"""
import json, sys
import jax, numpy as np
from absl import flags
from dlmjax import launch
from dlmjax.checkpoint import CheckpointError, load_checkpoint
from dlmjax.launch import rl_flags
F = flags.FLAGS
out = {}
for name, arg in json.loads(sys.argv[1]):
    F.unparse_flags()
    F(["launch", *arg])
    launch.check_job_flags(F.job)
    try:
        v = rl_flags.rl_config().value
        out[name] = None if v is None else [v.lr, v.clip, v.gamma, v.lam, v.train_every]
    except Exception as e:
        out[name] = "error: " + str(e)
        continue
    if F.value_model:  # as run_rl loads them
        kw = dict(dtype=F.param_dtype, compute_dtype=F.compute_dtype, remat=F.remat)
        cfg, params = load_checkpoint(F.init_ckpt, **kw)
        want = load_checkpoint(F.value_init_ckpt, **kw)[1] if F.value_init_ckpt else params
        try:
            vp = rl_flags.value_backbone(cfg, params)
            out[name + ":loaded"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                        zip(jax.tree.leaves(vp), jax.tree.leaves(want)))
            out[name + ":policy"] = vp is params
        except CheckpointError as e:
            out[name + ":loaded"] = "error: " + str(e)
print("RESULT " + json.dumps(out))
"""


def test_value_flags(tmp_path):
    """--value_model and its flags parse into the run's ValueConfig (defaults: the issue's table); --value_init_ckpt
    loads its params (same architecture required); value flags without --value_model, or --value_model with another
    objective, are usage errors; through the launcher: one `error:` line, exit 2."""
    from dlmjax.checkpoint import save_checkpoint
    from tests.launcher import ROOT, launch

    params = M.init_params(CFG, jax.random.key(0))
    save_checkpoint(CFG, jax.tree.map(np.asarray, params), str(tmp_path / "policy"))
    other = M.init_params(CFG, jax.random.key(1))
    save_checkpoint(CFG, jax.tree.map(np.asarray, other), str(tmp_path / "value"))
    wide = dataclasses.replace(CFG, intermediate_size=64)
    save_checkpoint(wide, jax.tree.map(np.asarray, M.init_params(wide, jax.random.key(0))), str(tmp_path / "wide"))
    base = ["--job=rl", f"--init_ckpt={tmp_path / 'policy'}", "--data=/y", f"--workdir={tmp_path / 'w'}"]
    tr = base + ["--rl_objective=tracerl"]
    argvs = [("off", tr), ("on", tr + ["--value_model"]),
             ("custom", tr + ["--value_model", "--value_lr=1e-5", "--value_clip=0.3", "--gamma=0.9", "--lam=0.8",
                              "--train_value_every=2", f"--value_init_ckpt={tmp_path / 'value'}"]),
             ("wide", tr + ["--value_model", f"--value_init_ckpt={tmp_path / 'wide'}"]),
             ("no_model", tr + ["--gamma=0.9"]), ("slim", base + ["--value_model"])]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(argvs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert got["off"] is None
    assert got["on"] == [5e-6, 0.2, 1.0, 1.0, 1] and got["on:policy"] is True  # default backbone: the policy's init
    assert got["custom"] == [1e-5, 0.3, 0.9, 0.8, 2]
    assert got["custom:loaded"] is True and got["custom:policy"] is False  # --value_init_ckpt's params
    assert got["wide:loaded"].startswith("error:") and "intermediate_size" in got["wide:loaded"]
    assert got["no_model"] == "error: --gamma needs --value_model"
    assert "--value_model needs --rl_objective=tracerl" in got["slim"]
    bad = launch(*base, "--value_model", timeout=300)
    assert bad.returncode == 2 and "error: --value_model needs --rl_objective=tracerl" in bad.stderr
    assert "Traceback" not in bad.stderr
