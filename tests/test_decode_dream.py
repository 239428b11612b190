"""Dream diffusion_generate (one jit) vs a plain-Python PyTorch re-statement of the reference loop."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax.decode import dream as D
from dlmjax.decode import sampling
from dlmjax.decode.dream import DreamDecodeConfig, diffusion_generate
from tests.dream_common import PROMPTS, assert_rows_decode_alone, left_pad, run_decoder
from tests.reference import fastdllm_dream as FD
from tests.reference import hf_models as R
from tests.reference import torch_dream as TD

G, STEPS = 12, 6  # schedule k = 1, 2, 2, 2, 2, 3


def _run(cfg, dc, params, prompts, **kw):
    return run_decoder(diffusion_generate, cfg, dc, params, prompts, **kw)


def _ref_kwargs(dc: DreamDecodeConfig):
    return dict(max_new=dc.max_new_tokens, steps=dc.steps, eps=dc.eps, alg=dc.alg, alg_temp=dc.alg_temp,
                temperature=dc.temperature, top_p=dc.top_p, top_k=dc.top_k, rule=dc.rule, tau=dc.tau,
                m=dc.budget_m, forbid_mask=dc.forbid_mask_token)


def _check(ours, ref):
    np.testing.assert_array_equal(ours["tokens"], ref["tokens"])
    np.testing.assert_array_equal(ours["step_map"], ref["step_map"])
    np.testing.assert_allclose(ours["conf"], ref["conf"], atol=1e-4)


def _recount(out, dc, n_forward=None):
    """TPF, expected wrong commits and per-step counts from the step map and confidences (slimrl_tracerl.md §0.4).
    n_forward: the expected forwards per row (default: dc.steps for every row)."""
    for i in range(out["tokens"].shape[0]):
        sm, conf = out["step_map"][i], out["conf"][i]
        dec = sm > 0
        tpf = dec.sum() / len(set(sm[dec].tolist())) if dec.any() else 0.0
        assert np.isclose(out["tpf"][i], tpf)
        assert np.isclose(out["ewc"][i], np.sum(1.0 - conf[dec]), atol=1e-5)
        counts = np.array([(sm == s + 1).sum() for s in range(dc.n_iterations)])
        np.testing.assert_array_equal(out["commits_per_step"][i], counts)
        assert np.isclose(out["ewc_per_step"][i].sum(), out["ewc"][i], atol=1e-5)
        assert out["n_forward"][i] == (dc.steps if n_forward is None else n_forward[i])


# ----------------------------------------------------------------------------------------------------------------------
# host schedule (no model)

def test_host_schedule_matches_torch():
    for n in list(range(2, 40)) + [129, 257, 513]:
        for eps in (1e-3, 0.05):
            np.testing.assert_array_equal(D.linspace_f32(1, eps, n), torch.linspace(1, eps, n).numpy())
    # spec §6.2 schedule shapes for N = 256
    k = D.lockstep_schedule(DreamDecodeConfig(max_new_tokens=256, steps=256))
    assert dict(zip(*np.unique(k, return_counts=True))) == {0: 1, 1: 254, 2: 1}
    k = D.lockstep_schedule(DreamDecodeConfig(max_new_tokens=256, steps=128))
    assert dict(zip(*np.unique(k, return_counts=True))) == {1: 1, 2: 126, 3: 1}
    # the reference's own k_i (torch float32 0-d tensors) equal the host schedule
    for g, s in [(12, 6), (16, 16), (64, 24)]:
        ts, n, ks = torch.linspace(1, 1e-3, s + 1), torch.tensor(g * 3), []
        for i in range(s):
            nbar = n / 3
            kk = int(nbar * (1 - ts[i + 1] / ts[i])) if i < s - 1 else int(nbar)
            ks.append(kk)
            n = n - 3 * kk
        np.testing.assert_array_equal(D.lockstep_schedule(DreamDecodeConfig(max_new_tokens=g, steps=s)), ks)
        frac = (1 - ts[1:] / ts[:-1]).numpy()
        np.testing.assert_array_equal(D.transfer_fractions(s, 1e-3)[:-1], frac[:-1])
        floor = D.row_floor_table(s, 1e-3, g)
        for i in range(s - 1):
            assert list(floor[i]) == [int(m * float(frac[i])) for m in range(g + 1)]
        assert list(floor[-1]) == list(range(g + 1))
    # n̄ = S / B: torch CPU divides exactly; CUDA multiplies by f32(1/B), which for B = 41 puts n̄ below an integer
    for b in (3, 41):
        s = torch.arange(b * 20 + 1)
        np.testing.assert_array_equal(D.batch_mean_table(b, 20), (s / b).numpy())
        np.testing.assert_array_equal(D.batch_mean_table(b, 20, "reciprocal"),
                                      (s.float() * torch.tensor(1.0 / b, dtype=torch.float32)).numpy())
    rec = D.batch_mean_table(41, 4, "reciprocal")
    assert rec[41] < 1.0 and int(rec[41]) == 0  # lock-step n = 1 -> the CUDA reference would commit 0 at the end


def test_config_validation():
    for bad in (dict(alg="random"), dict(rule="static"), dict(alg="origin", rule="tau_budget"),
                dict(alg="maskgit_plus", rule="dynamic", alg_temp=0.5), dict(alg="origin", alg_temp=1.0),
                dict(top_k=0), dict(top_p=1.5), dict(eps=0.0), dict(conf_dtype="float64"), dict(batch_mean="x")):
        with pytest.raises(ValueError):
            DreamDecodeConfig(**bad)


def test_candidates_equal_sample_dream():
    """The loop's sampler composition returns sampling.sample_dream's (confidence, x0), plus p(x0) = its
    maskgit_plus confidence."""
    logits = 3.0 * jax.random.normal(jax.random.key(1), (2, 5, 40), jnp.float32)
    toks = jax.random.randint(jax.random.key(2), (2, 5), 0, 40)
    for alg, t, top_p, top_k in (("maskgit_plus", 0.0, None, None), ("topk_margin", 0.0, 0.8, 7),
                                 ("entropy", 0.7, 0.9, None)):
        dc = DreamDecodeConfig(alg=alg, temperature=t, top_p=top_p, top_k=top_k)

        @jax.jit
        def both(logits, toks):
            kw = dict(tokens=toks) if t > 0 else {}
            s = functools.partial(sampling.sample_dream, logits, temperature=t, top_p=top_p, top_k=top_k,
                                  dtype=jnp.bfloat16, **kw)
            return D.candidates(dc, logits, jnp.bfloat16, **kw), s(alg=alg), s(alg="maskgit_plus")

        (x0, p, conf), (c_ref, x_ref), (p_ref, _) = jax.device_get(both(logits, toks))
        np.testing.assert_array_equal(x0, x_ref)
        np.testing.assert_array_equal(conf.astype(np.float32), c_ref.astype(np.float32))
        np.testing.assert_array_equal(p.astype(np.float32), p_ref.astype(np.float32))


def test_schedule_surplus_remasks_lowest_non_masked_slots():
    """A row with fewer masks than the batch-mean k (after a committed mask token) gets its surplus picks on
    non-masked slots, which the loop re-masks (reference: X = m there), lowest index first."""
    dc = DreamDecodeConfig(alg="maskgit_plus", steps=1, max_new_tokens=4)
    tables = dict(frac=jnp.asarray(D.transfer_fractions(1, dc.eps)), nbar=jnp.asarray(D.batch_mean_table(2, 4)))
    masked = jnp.array([[True, True, True, False], [False, False, True, False]])
    conf = jnp.where(masked, jnp.array([[0.5, 0.9, 0.7, 0.0], [0.0, 0.0, 0.8, 0.0]]), -jnp.inf)
    sel = np.asarray(D.select(dc, tables, 0, conf, masked))  # n̄ = 2, last step -> k = 2 in both rows
    np.testing.assert_array_equal(sel, [[False, True, True, False], [True, False, True, False]])


# ----------------------------------------------------------------------------------------------------------------------
# whole loop vs the torch re-statement

@pytest.mark.parametrize("alg,top_p,top_k", [("maskgit_plus", None, None), ("topk_margin", None, 20),
                                             ("entropy", 0.9, None)])
def test_greedy_matches_reference(dream, alg, top_p, top_k):
    model, cfg, params = dream
    dc = DreamDecodeConfig(max_new_tokens=G, steps=STEPS, alg=alg, top_p=top_p, top_k=top_k, forbid_mask_token=True)
    ours = _run(cfg, dc, params, PROMPTS)
    ids, valid = left_pad(PROMPTS)
    ref = TD.diffusion_generate(model, ids, valid, mask_id=cfg.mask_token_id, **_ref_kwargs(dc))
    _check(ours, ref)
    lock = D.lockstep_schedule(dc)
    np.testing.assert_array_equal(ref["k"], lock)
    for i in range(len(PROMPTS)):  # lock-step: every row commits exactly k_i per step
        np.testing.assert_array_equal(ours["commits_per_step"][i], lock)
    assert (ours["step_map"] > 0).all() and not (ours["tokens"] == cfg.mask_token_id).any()
    _recount(ours, dc)
    if alg == "maskgit_plus":
        # batched = one at a time (same padded width: one compilation), lengths form of prompt_valid
        assert_rows_decode_alone(diffusion_generate, cfg, dc, params, ours, ("tokens", "step_map"))
        # a padded row decodes as the same prompt alone without padding (tok_idx positions, pad rows invisible)
        ids1 = jnp.asarray([PROMPTS[0]], jnp.int32)
        alone = jax.device_get(diffusion_generate(cfg, dc, params, ids1, jnp.ones((1, 5), bool), jax.random.key(0)))
        np.testing.assert_array_equal(alone["tokens"][0], ours["tokens"][0])
        np.testing.assert_array_equal(alone["step_map"][0], ours["step_map"][0])


@pytest.mark.parametrize("alg,temperature,top_p,top_k,forbid", [("origin", 0.8, None, 20, False),
                                                                 ("maskgit_plus", 0.7, 0.9, None, True)])
def test_sampled_with_replayed_draws_matches_reference(dream, alg, temperature, top_p, top_k, forbid):
    model, cfg, params = dream
    dc = DreamDecodeConfig(max_new_tokens=G, steps=STEPS, alg=alg, temperature=temperature, top_p=top_p,
                           top_k=top_k, forbid_mask_token=forbid)
    ids, valid = left_pad(PROMPTS)
    ref = TD.diffusion_generate(model, ids, valid, mask_id=cfg.mask_token_id, seed=7, **_ref_kwargs(dc))
    names = ("uniforms", "tokens") if alg == "origin" else ("tokens",)
    ours = _run(cfg, dc, params, PROMPTS, replay={k: ref["draws"][k] for k in names})
    _check(ours, ref)
    _recount(ours, dc)
    if alg == "origin":  # random subsets: the per-step counts vary between rows
        assert len({tuple(r) for r in ours["commits_per_step"]}) > 1


def test_alg_temp_with_replayed_gumbel_matches_reference(dream):
    model, cfg, params = dream
    dc = DreamDecodeConfig(max_new_tokens=G, steps=STEPS, alg="topk_margin", alg_temp=0.5, forbid_mask_token=True)
    ids, valid = left_pad(PROMPTS)
    ref = TD.diffusion_generate(model, ids, valid, mask_id=cfg.mask_token_id, seed=3, **_ref_kwargs(dc))
    ours = _run(cfg, dc, params, PROMPTS, replay={"gumbel": ref["draws"]["gumbel"]})
    _check(ours, ref)
    _recount(ours, dc)
    plain = TD.diffusion_generate(model, ids, valid, mask_id=cfg.mask_token_id,
                                  **{**_ref_kwargs(dc), "alg_temp": None})
    assert not np.array_equal(plain["step_map"], ref["step_map"])  # the noise really changes the order


@pytest.mark.parametrize("rule,tau,m", [("tau_budget", 0.7, 1.0), ("tau_budget", 0.5, 0.0), ("dynamic", 0.7, 1.0)])
def test_rule_matches_reference(dream, rule, tau, m):
    """τ-budget (SLIM-RL) and dynamic threshold on Dream's loop, floor = each row's own schedule count."""
    model, cfg, params = dream
    dc = DreamDecodeConfig(max_new_tokens=G, steps=STEPS, alg="maskgit_plus", rule=rule, tau=tau, budget_m=m,
                           forbid_mask_token=True)
    ours = _run(cfg, dc, params, PROMPTS)
    ids, valid = left_pad(PROMPTS)
    ref = TD.diffusion_generate(model, ids, valid, mask_id=cfg.mask_token_id, **_ref_kwargs(dc))
    _check(ours, ref)
    _recount(ours, dc)
    assert (ours["step_map"] > 0).all()  # the last step flushes every row
    assert (ours["tpf"] > G / STEPS).any()  # some row beats the schedule: the rule is really exercised


def test_mask_token_may_be_sampled_by_default(dream):
    """Reference quirk: a sampled mask token is 'committed' and stays masked, so rows leave lock-step: n̄ (the
    batch mean) becomes fractional, k follows it, and slots can still be masked at the end. The boost is mild
    enough that no row ever holds fewer masks than k (the reference's choice of slots is undefined there)."""
    model, cfg, params = dream
    boost = 1.5
    boosted = {**params, "lm_head": params["lm_head"].at[cfg.mask_token_id].multiply(boost)}
    dc = DreamDecodeConfig(max_new_tokens=G, steps=G, alg="maskgit_plus")
    ids, valid = left_pad(PROMPTS)
    ref = TD.diffusion_generate(R.scaled_lm_head(model, boost, cfg.mask_token_id), ids, valid,
                                mask_id=cfg.mask_token_id, **_ref_kwargs(dc))
    assert ref["surplus"] == 0
    ours = _run(cfg, dc, boosted, PROMPTS)
    _check(ours, ref)
    left = ours["tokens"] == cfg.mask_token_id
    assert len(set(left.sum(1).tolist())) > 1  # rows out of lock-step
    assert (ours["step_map"][left] == 0).all()
    np.testing.assert_array_equal(ours["commits_per_step"].sum(1), (~left).sum(1))


def test_deterministic_given_seed_bf16(dream):
    """Production path: PRNG key, bf16 activations and confidences (the reference's dtype)."""
    _, cfg, params = dream
    cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    dc = DreamDecodeConfig(max_new_tokens=G, steps=STEPS, alg="entropy", temperature=1.0, top_p=0.95)
    a = _run(cfg, dc, params, PROMPTS, key=5)
    b = _run(cfg, dc, params, PROMPTS, key=5)
    c = _run(cfg, dc, params, PROMPTS, key=6)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["step_map"], b["step_map"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    conf = a["conf"][a["step_map"] > 0]
    np.testing.assert_array_equal(conf.astype(jnp.bfloat16).astype(np.float32), conf)  # p is a bf16 value
    _recount(a, dc)


# ----------------------------------------------------------------------------------------------------------------------
# Fast-dLLM v1 alg='confidence_threshold' (§6.4.3) vs tests/reference/fastdllm_dream.py (batch 1, as the reference)

def _ct(**kw):
    return DreamDecodeConfig(**{"max_new_tokens": G, "alg": "confidence_threshold", "forbid_mask_token": True, **kw})


def _ct_ref(model, cfg, dc, prompt, **kw):
    cd = None if dc.conf_dtype is None else getattr(torch, dc.conf_dtype)
    return FD.generate(model, prompt, max_new=dc.max_new_tokens, steps=dc.steps, mask_id=cfg.mask_token_id,
                       tau=dc.tau, temperature=dc.temperature, top_p=dc.top_p, top_k=dc.top_k, conf_dtype=cd,
                       forbid_mask=dc.forbid_mask_token, **kw)


def _check_row(ours, i, ref):
    np.testing.assert_array_equal(ours["tokens"][i], ref["tokens"])
    np.testing.assert_array_equal(ours["step_map"][i], ref["step_map"])
    np.testing.assert_allclose(ours["conf"][i], ref["conf"], atol=1e-4)
    assert ours["n_forward"][i] == ref["n_forward"]


def test_confidence_threshold_config():
    with pytest.raises(ValueError, match="max_new_tokens=12 is not divisible by steps=5"):
        _ct(steps=5)
    for bad in (dict(steps=4, rule="dynamic"), dict(steps=4, alg_temp=0.5), dict(steps=4, max_steps=3)):
        with pytest.raises(ValueError):
            _ct(**bad)
    with pytest.raises(ValueError, match="max_steps"):
        DreamDecodeConfig(alg="maskgit_plus", max_steps=10)
    assert _ct(steps=4).n_iterations == G and _ct(steps=4, max_steps=7).n_iterations == 7
    assert DreamDecodeConfig(alg="entropy", steps=6).n_iterations == 6


def test_select_threshold_rule():
    """Top K of the masked slots (ties to the lower index), the first kept always, the others dropped when c < τ
    compared in the confidence dtype (bf16(0.9) = 0.8984375); dropped = K - #committed, picks past the masks too."""
    c = jnp.array([[0.5, 0.8984375, 0.95, 0.95, 0.3, 0.99],    # ties 2/3 inside the picks; slot 1 sits at bf16(τ)
                   [0.2, 0.1, 0.2, 0.0, 0.0, 0.0],             # K = 5 > 3 masks; the first (a tie 0/2) is below τ
                   [0.97, 0.99, 0.97, 0.99, 0.1, 0.1]])        # a tie 0/2 at the K boundary
    masked = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    k = jnp.array([3, 5, 3], jnp.int32)
    conf = jnp.where(masked, c, -jnp.inf)
    want = np.zeros((3, 6), bool)
    want[0, [1, 2, 3]] = want[1, 0] = want[2, [0, 1, 3]] = True
    commit, dropped = jax.device_get(D.select_threshold(conf.astype(jnp.bfloat16), masked, k, 0.9))
    np.testing.assert_array_equal(commit, want)
    np.testing.assert_array_equal(dropped, [0, 4, 0])
    want[0, 1] = False                                          # float32: 0.8984375 < 0.9
    commit, dropped = jax.device_get(D.select_threshold(conf, masked, k, 0.9))
    np.testing.assert_array_equal(commit, want)
    np.testing.assert_array_equal(dropped, [1, 4, 0])


CT_CASES = {  # steps, tau, conf_dtype
    "q4_low_tau": (3, 0.7, None),      # q = 4: most forwards commit 3-4 slots; drops at the last step extend rows
    "q2_carry": (6, 0.9, None),        # carries grow K above q, extensions up to 9 forwards, forced first picks
    "bf16_ties": (3, 0.998, "bfloat16"),  # bf16 confidences: decisive ties, bf16(0.998) = 0.99609375 keeps c < τ
}


@pytest.mark.parametrize("case", list(CT_CASES))
def test_confidence_threshold_matches_reference(dream, case):
    """Greedy: the batched, left-padded loop equals the batch-1 torch reference on every row (own carry, own
    extension; rows that finished early do not change), equals one-at-a-time decoding, and its statistics equal a
    recount from the step map (every forward commits >= 1 slot: TPF = G / n_forward)."""
    model, cfg, params = dream
    steps, tau, conf_dtype = CT_CASES[case]
    dc = _ct(steps=steps, tau=tau, conf_dtype=conf_dtype)
    ours = _run(cfg, dc, params, PROMPTS)
    refs = [_ct_ref(model, cfg, dc, pr) for pr in PROMPTS]
    for i, ref in enumerate(refs):
        _check_row(ours, i, ref)
    n_fwd = [r["n_forward"] for r in refs]
    _recount(ours, dc, n_fwd)
    np.testing.assert_allclose(ours["tpf"], G / np.array(n_fwd), rtol=1e-6)
    assert (ours["step_map"] > 0).all()
    assert max(n_fwd) > steps and len(set(n_fwd)) > 1           # extensions, different per row
    q = G // steps
    if case == "q4_low_tau":
        assert (ours["commits_per_step"] >= q - 1).sum() >= 8   # several slots per forward
    if case == "q2_carry":
        assert max(k for r in refs for k in r["k"][:steps]) > q and sum(r["forced"] for r in refs) > 0
    if case == "bf16_ties":
        assert sum(r["boundary_ties"] for r in refs) > 0 and sum(r["tau_edge"] for r in refs) > 0
    if case != "q4_low_tau":  # batched = one at a time
        assert_rows_decode_alone(diffusion_generate, cfg, dc, params, ours)


def test_confidence_threshold_sampled_with_replayed_tokens(dream):
    model, cfg, params = dream
    dc = _ct(steps=4, tau=0.8, temperature=0.7, top_p=0.95)
    refs = [_ct_ref(model, cfg, dc, pr, seed=11 + i) for i, pr in enumerate(PROMPTS)]
    tokens = np.full((len(PROMPTS), dc.n_iterations, G), cfg.mask_token_id, np.int32)
    for i, r in enumerate(refs):
        tokens[i, :r["n_forward"]] = r["draws"]
    ours = _run(cfg, dc, params, PROMPTS, replay={"tokens": tokens})
    for i, ref in enumerate(refs):
        _check_row(ours, i, ref)
    _recount(ours, dc, [r["n_forward"] for r in refs])
    assert max(r["n_forward"] for r in refs) > dc.steps


def test_confidence_threshold_max_steps_guard(dream):
    """max_steps caps the while_loop: rows that would extend past it stop there with masks left; what was decoded
    up to the cap is the uncapped run's."""
    model, cfg, params = dream
    steps, tau, _ = CT_CASES["q2_carry"]
    full = _run(cfg, _ct(steps=steps, tau=tau), params, PROMPTS)
    dc = _ct(steps=steps, tau=tau, max_steps=steps)
    capped = _run(cfg, dc, params, PROMPTS)
    assert (full["n_forward"] > steps).all()
    np.testing.assert_array_equal(capped["n_forward"], [steps] * len(PROMPTS))
    early = full["step_map"] <= steps
    np.testing.assert_array_equal(capped["step_map"], np.where(early, full["step_map"], 0))
    np.testing.assert_array_equal(capped["tokens"], np.where(early, full["tokens"], cfg.mask_token_id))
    _recount(capped, dc, [steps] * len(PROMPTS))
