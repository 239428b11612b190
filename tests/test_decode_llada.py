"""LLaDA generate (one jit) vs a plain-Python PyTorch re-statement of the reference loop (spec §6.1, §6.4.1)."""

import jax
import numpy as np
import pytest

from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode.llada import LLaDADecodeConfig, generate
from tests.reference import hf_models as R
from tests.reference import torch_loops as TL

SHARPEN = 5.0
# left-padded batch: the reference never re-indexes positions, so each row is compared with its own padding
PROMPTS = np.array([[1, 1, 5, 9, 33, 21], [40, 2, 17, 8, 8, 60], [1, 1, 1, 1, 70, 3]], np.int32)
VALID = PROMPTS != 1
VALID[1] = True


@pytest.fixture(scope="module")
def llada(imported):
    model, ckpt, raw, _ = imported("llada")
    cfg, params = load_checkpoint(ckpt)
    return R.scaled_lm_head(model, SHARPEN), cfg, {**params, "lm_head": params["lm_head"] * SHARPEN}


def _compare(ours, refs):
    for i, r in enumerate(refs):
        np.testing.assert_array_equal(np.asarray(ours["tokens"][i]), r["tokens"][:], err_msg=f"row {i}")
        np.testing.assert_array_equal(np.asarray(ours["step_map"][i]), r["step_map"], err_msg=f"row {i}")
        assert int(ours["n_forward"][i]) == r["n_forward"]


@pytest.mark.parametrize("rule,steps,kw", [
    ("low_confidence", 6, {}),
    ("fast_dllm_threshold", 6, {"tau": 0.6}),
    ("fast_dllm_factor", 6, {"factor": 1.0}),
    ("tau_budget", 6, {"tau": 0.6, "m": 1.0}),
])
def test_greedy_matches_reference(llada, rule, steps, kw):
    model, cfg, params = llada
    dc = LLaDADecodeConfig(gen_length=12, block_length=4, steps=steps, rule=rule, tau=kw.get("tau", 0.9),
                           budget_m=kw.get("m", 1.0), factor=kw.get("factor", 1.0))
    ours = jax.device_get(generate(cfg, dc, params, PROMPTS, VALID, jax.random.key(0)))
    conf_dt = np.float32 if rule == "low_confidence" else np.float64
    refs = [TL.llada_generate(model, PROMPTS[i], VALID[i], gen=12, block=4, steps=steps, rule=rule,
                              mask_id=cfg.mask_token_id, conf_dtype=conf_dt, **kw) for i in range(3)]
    _compare(ours, refs)
    if rule != "low_confidence":
        assert (ours["tpf"] > 1).any()  # the data-dependent rules commit several tokens in some steps
    else:
        np.testing.assert_allclose(ours["tpf"], 12 / 6)  # exactly the static schedule


@pytest.mark.parametrize("rule", ["low_confidence", "tau_budget"])
def test_cfg_guidance_matches_reference(llada, rule):
    """cfg_scale > 0: the unconditional branch masks the prompt area; l = l_u + (w + 1)(l_c - l_u)."""
    model, cfg, params = llada
    dc = LLaDADecodeConfig(gen_length=8, block_length=4, steps=4, rule=rule, tau=0.6, cfg_scale=1.5)
    ours = jax.device_get(generate(cfg, dc, params, PROMPTS, VALID, jax.random.key(0)))
    refs = [TL.llada_generate(model, PROMPTS[i], VALID[i], gen=8, block=4, steps=4, rule=rule, tau=0.6,
                              mask_id=cfg.mask_token_id, conf_dtype=np.float32 if rule == "low_confidence"
                              else np.float64, cfg_scale=1.5) for i in range(3)]
    _compare(ours, refs)
    plain = jax.device_get(generate(cfg, LLaDADecodeConfig(gen_length=8, block_length=4, steps=4, rule=rule, tau=0.6),
                                    params, PROMPTS, VALID, jax.random.key(0)))
    assert (np.asarray(plain["tokens"]) != np.asarray(ours["tokens"])).any()  # guidance changed something
    with pytest.raises(ValueError, match="cfg_scale"):
        LLaDADecodeConfig(cfg_scale=1.0, cache="prefix")


def test_random_remasking_with_replayed_uniforms(llada):
    model, cfg, params = llada
    rng = np.random.default_rng(0)
    uni = rng.random((3, 6, 4)).astype(np.float32)
    dc = LLaDADecodeConfig(gen_length=12, block_length=4, steps=6, rule="random")
    ours = jax.device_get(generate(cfg, dc, params, PROMPTS, VALID, jax.random.key(0), uni))
    refs = [TL.llada_generate(model, PROMPTS[i], VALID[i], gen=12, block=4, steps=6, rule="random",
                              mask_id=cfg.mask_token_id, uniforms=uni[i]) for i in range(3)]
    _compare(ours, refs)


def test_gumbel_sampling_with_replayed_noise(llada):
    """T > 0: LLaDA's float64 Gumbel path with the reference's uniforms replayed."""
    model, cfg, params = llada
    rng = np.random.default_rng(1)
    v = cfg.vocab_size
    uni = rng.random((3, 6, 4, v))
    dc = LLaDADecodeConfig(gen_length=12, block_length=4, steps=6, rule="low_confidence", temperature=1.0)
    ours = jax.device_get(generate(cfg, dc, params, PROMPTS, VALID, jax.random.key(0), uni))
    refs = [TL.llada_generate(model, PROMPTS[i], VALID[i], gen=12, block=4, steps=6, rule="low_confidence",
                              mask_id=cfg.mask_token_id, temperature=1.0, uniforms=uni[i]) for i in range(3)]
    _compare(ours, refs)
    greedy = jax.device_get(generate(cfg, LLaDADecodeConfig(gen_length=12, block_length=4, steps=6), params,
                                     PROMPTS, VALID, jax.random.key(0)))
    assert not np.array_equal(ours["tokens"], greedy["tokens"])  # the noise really changed the draws


def test_batched_equals_one_at_a_time_and_stats(llada):
    _, cfg, params = llada
    dc = LLaDADecodeConfig(gen_length=12, block_length=4, steps=6, rule="tau_budget", tau=0.6)
    ours = jax.device_get(generate(cfg, dc, params, PROMPTS, VALID, jax.random.key(0)))
    for i in range(3):
        one = jax.device_get(generate(cfg, dc, params, PROMPTS[i:i + 1], VALID[i:i + 1], jax.random.key(0)))
        np.testing.assert_array_equal(one["tokens"][0], ours["tokens"][i])
        np.testing.assert_array_equal(one["step_map"][0], ours["step_map"][i])
        sm = ours["step_map"][i]
        assert np.isclose(ours["tpf"][i], (sm > 0).sum() / len(set(sm[sm > 0].tolist())))
        assert np.isclose(ours["ewc"][i], np.sum(1 - ours["conf"][i][sm > 0]), atol=1e-6)
        assert ours["commits_per_step"][i].sum() == 12


def test_bad_geometry_is_rejected():
    with pytest.raises(ValueError, match="gen_length=10 is not a multiple of block_length=4"):
        LLaDADecodeConfig(gen_length=10, block_length=4, steps=5)
    with pytest.raises(ValueError, match="steps=5 is not a multiple of the number of blocks 2"):
        LLaDADecodeConfig(gen_length=8, block_length=4, steps=5)
    with pytest.raises(ValueError, match="rule: 'sometimes'"):
        LLaDADecodeConfig(rule="sometimes")


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_caches_match_reference(llada, cache):
    """Fast-dLLM v1 prefix / dual cache: approximate by design (stale K/V), reproduced, not fixed."""
    model, cfg, params = llada
    dc = LLaDADecodeConfig(gen_length=12, block_length=4, steps=6, rule="fast_dllm_threshold", tau=0.6, cache=cache)
    ours = jax.device_get(generate(cfg, dc, params, PROMPTS, VALID, jax.random.key(0)))
    refs = [TL.llada_generate(model, PROMPTS[i], VALID[i], gen=12, block=4, steps=6, rule="fast_dllm_threshold",
                              mask_id=cfg.mask_token_id, conf_dtype=np.float64, tau=0.6, cache=cache)
            for i in range(3)]
    _compare(ours, refs)
    exact = jax.device_get(generate(cfg, LLaDADecodeConfig(gen_length=12, block_length=4, steps=6,
                                                           rule="fast_dllm_threshold", tau=0.6), params,
                                    PROMPTS, VALID, jax.random.key(0)))
    # the caches are really stale: confidences after the first step of a block differ from the exact decode
    assert not np.allclose(ours["conf"], exact["conf"], atol=1e-6)
