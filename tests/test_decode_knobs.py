"""Decoder knobs (issue 13): T = 0 means greedy on every decoder, negative temperatures, tau outside [0, 1] (NaN
included), top_p outside (0, 1] and unknown confidence dtypes are refused with a message naming the field."""

import math

import numpy as np
import pytest

from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode.dream import DreamDecodeConfig
from dlmjax.decode.dream_cache import DreamCacheDecodeConfig
from dlmjax.decode.llada import LLaDADecodeConfig
from dlmjax.decode.sdar import BlockDecodeConfig, block_generate

ALL = (BlockDecodeConfig, LLaDADecodeConfig, DreamDecodeConfig, DreamCacheDecodeConfig)


@pytest.mark.parametrize("cls", ALL)
def test_out_of_range_knobs_are_refused(cls):
    for bad in ({"temperature": -1.0}, {"temperature": math.nan}):
        with pytest.raises(ValueError, match="temperature"):
            cls(**bad)
    for tau in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="tau"):
            cls(tau=tau)


def test_sdar_top_p_and_conf_dtype_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        BlockDecodeConfig(top_p=2.0)
    with pytest.raises(ValueError, match="top_p"):
        BlockDecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="conf_dtype"):
        BlockDecodeConfig(conf_dtype="int8")
    with pytest.raises(ValueError, match="conf_dtype"):
        LLaDADecodeConfig(conf_dtype="int8")


def test_temperature_zero_is_greedy_on_sdar(imported):
    """T = 0 gives exactly --greedy's tokens, step map and confidences (and does not sample: two keys agree)."""
    import jax
    import jax.numpy as jnp

    assert BlockDecodeConfig(temperature=0.0).greedy and not BlockDecodeConfig().greedy
    _, ckpt, _, _ = imported("sdar")
    cfg, params = load_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(2, cfg.vocab_size - 2, (2, 6)), jnp.int32)
    lens = jnp.asarray([6, 4], jnp.int32)
    base = dict(block_size=4, steps=4, max_new_tokens=8, rule="dynamic")
    g = block_generate(cfg, BlockDecodeConfig(greedy=True, **base), params, prompts, lens, jax.random.key(0))
    for seed in (1, 2):
        t0 = block_generate(cfg, BlockDecodeConfig(temperature=0.0, **base), params, prompts, lens,
                            jax.random.key(seed))
        for k in ("tokens", "step_map", "conf"):
            np.testing.assert_array_equal(np.asarray(t0[k]), np.asarray(g[k]), err_msg=k)
