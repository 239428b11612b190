"""SDAR block decoding (one jit, KV cache) vs a plain-Python PyTorch re-statement of the reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode.sdar import BlockDecodeConfig, block_generate
from tests.reference import hf_models as R
from tests.reference import torch_loops as TL

PROMPTS = [[3, 17, 22, 9, 41], [8, 8, 30, 2, 11, 60, 7, 19], [50, 4]]  # lengths 5, 8 (= 2 full blocks), 2 (< K)
STOP = 35  # a token this model emits early in some rows and not in others (per-row stopping)
SHARPEN = 5.0  # lm-head scale: a random model is too unsure for thresholds to matter; this makes TPF > 1


@pytest.fixture(scope="module")
def sdar(imported):
    model, ckpt, raw, _ = imported("sdar")
    cfg, params = load_checkpoint(ckpt)
    return R.scaled_lm_head(model, SHARPEN, None), cfg, {**params, "lm_head": params["lm_head"] * SHARPEN}


def _batch(prompts, p=None):
    p = p or max(map(len, prompts))
    arr = np.zeros((len(prompts), p), np.int32)
    for i, pr in enumerate(prompts):
        arr[i, :len(pr)] = pr
    return jnp.asarray(arr), jnp.asarray([len(pr) for pr in prompts], jnp.int32)


def _check_row(ours, i, ref):
    n = int(ours["lengths"][i])
    assert n == len(ref["tokens"])
    np.testing.assert_array_equal(np.asarray(ours["tokens"][i, :n]), ref["tokens"])
    np.testing.assert_array_equal(np.asarray(ours["step_map"][i, :n]), ref["step_map"])
    assert int(ours["n_denoise"][i]) == ref["n_denoise"] and int(ours["n_save"][i]) == ref["n_save"]


@pytest.mark.parametrize("rule,block,steps,kw", [
    ("dynamic", 4, 4, {}), ("tau_budget", 4, 4, {}), ("static", 4, 2, {}), ("sequential", 4, 4, {}),
    ("contiguous_dynamic", 4, 4, {}), ("nlc_bounded_dynamic", 4, 4, {"nlc_budget": 1.0}), ("gc_dynamic", 4, 4, {}),
    ("entropy_bounded", 4, 4, {"eb_threshold": 2.5})])
def test_greedy_matches_reference(sdar, rule, block, steps, kw):
    model, cfg, params = sdar
    dc = BlockDecodeConfig(block_size=block, steps=steps, max_new_tokens=10, rule=rule, tau=0.7, greedy=True,
                           stop_ids=(STOP,), forbid_mask_token=True, **kw)
    prompts, lens = _batch(PROMPTS)
    ours = jax.device_get(block_generate(cfg, dc, params, prompts, lens, jax.random.key(0)))
    for i, pr in enumerate(PROMPTS):
        ref = TL.sdar_block_decode(model, pr, block=block, steps=steps, max_new=10, rule=rule, tau=0.7,
                                   mask_id=cfg.mask_token_id, stop_ids=(STOP,), forbid_mask=True, **kw)
        _check_row(ours, i, ref)
        if rule == "dynamic":  # batched == one at a time (same padded width: one compilation)
            one = jax.device_get(block_generate(cfg, dc, params, *_batch([pr], 8), jax.random.key(0)))
            np.testing.assert_array_equal(one["tokens"][0], ours["tokens"][i])
            np.testing.assert_array_equal(one["step_map"][0], ours["step_map"][i])
    if rule not in ("static", "sequential"):
        assert (ours["tpf"] > 1).any()  # several tokens per step happen, so the rule is really exercised
    if rule in ("static", "dynamic", "tau_budget"):
        assert (ours["lengths"] < 10).any() and (ours["lengths"] == 10).any()  # rows stop independently


def test_sampled_with_replayed_draws_matches_reference(sdar):
    model, cfg, params = sdar
    kw = dict(block=4, steps=4, max_new=12, rule="dynamic", tau=0.5, greedy=False, temperature=0.8, top_k=20,
              top_p=0.9)
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=12, rule="dynamic", tau=0.5, temperature=0.8,
                           top_k=20, top_p=0.9)
    refs = [TL.sdar_block_decode(model, pr, mask_id=cfg.mask_token_id, seed=i, **kw) for i, pr in enumerate(PROMPTS)]
    t = max(len(r["sampled"]) for r in refs)
    replay = np.zeros((len(PROMPTS), t, 4), np.int32)
    for i, r in enumerate(refs):
        replay[i, :len(r["sampled"])] = np.stack(r["sampled"])
    prompts, lens = _batch(PROMPTS)
    ours = jax.device_get(block_generate(cfg, dc, params, prompts, lens, jax.random.key(0), jnp.asarray(replay)))
    for i, r in enumerate(refs):
        _check_row(ours, i, r)


def test_mask_token_may_be_sampled_by_default(sdar):
    """Reference quirk: without forbid_mask_token a sampled mask token is 'committed' and stays masked; the block
    still ends after S steps. Forbidding it removes every mask from the output."""
    model, cfg, params = sdar
    prompts, lens = _batch(PROMPTS)
    # make the mask token the model's favourite by boosting its lm-head row
    boosted = {**params, "lm_head": params["lm_head"].at[cfg.mask_token_id].multiply(40.0)}
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=8, rule="static", greedy=True)
    out = jax.device_get(block_generate(cfg, dc, boosted, prompts, lens, jax.random.key(0)))
    ref = TL.sdar_block_decode(R.scaled_lm_head(model, 40.0, cfg.mask_token_id), PROMPTS[0], block=4, steps=4,
                               max_new=8, rule="static", mask_id=cfg.mask_token_id)
    _check_row(out, 0, ref)
    assert (out["tokens"] == cfg.mask_token_id).any()
    dc2 = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=8, rule="static", greedy=True,
                            forbid_mask_token=True)
    out2 = jax.device_get(block_generate(cfg, dc2, boosted, prompts, lens, jax.random.key(0)))
    assert not (out2["tokens"] == cfg.mask_token_id).any()




def test_stats_recount_from_step_map(sdar):
    """TPF and expected wrong commits equal a NumPy recount from the returned step map and confidences."""
    _, cfg, params = sdar
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=12, rule="dynamic", tau=0.2, temperature=0.7,
                           stop_ids=(STOP,))
    prompts, lens = _batch(PROMPTS)
    out = jax.device_get(block_generate(cfg, dc, params, prompts, lens, jax.random.key(3)))
    for i in range(len(PROMPTS)):
        n = int(out["lengths"][i])
        sm = np.asarray(out["step_map"][i, :n])
        dec = sm > 0
        tpf = dec.sum() / len(set(sm[dec].tolist())) if dec.any() else 0.0
        assert np.isclose(out["tpf"][i], tpf)
        assert np.isclose(out["ewc"][i], np.sum(1.0 - np.asarray(out["conf"][i, :n])[dec]), atol=1e-5)
        assert int(np.sum(out["commits_per_step"][i])) >= dec.sum()  # later-truncated commits also count per step


def test_deterministic_given_seed(sdar):
    _, cfg, params = sdar
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=8, rule="tau_budget", temperature=1.0)
    prompts, lens = _batch(PROMPTS)
    a = jax.device_get(block_generate(cfg, dc, params, prompts, lens, jax.random.key(5)))
    b = jax.device_get(block_generate(cfg, dc, params, prompts, lens, jax.random.key(5)))
    c = jax.device_get(block_generate(cfg, dc, params, prompts, lens, jax.random.key(6)))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
