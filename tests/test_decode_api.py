"""`decode.api.generate`: one prompt convention (left-padded ids + lengths) and one Rollout for every decoder.

Each decoder's Rollout equals its old entry point called with its own convention (SDAR: left-aligned + lengths;
LLaDA / Dream: left-padded + valid mask) and the same key, on prompts of different lengths whose pad columns hold
junk; the Rollout's fields agree with each other (recomputed in NumPy); 8 fake CPU devices give the tokens of one.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlmjax import model as M
from dlmjax.decode import api
from dlmjax.decode.dream import DreamDecodeConfig, diffusion_generate
from dlmjax.decode.dream_cache import DreamCacheDecodeConfig, block_generate_cached
from dlmjax.decode.llada import LLaDADecodeConfig
from dlmjax.decode.llada import generate as llada_generate
from dlmjax.decode.sdar import BlockDecodeConfig, block_generate
from tests.workers import decode_mesh as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [8, 5, 2, 6]  # width 8: one row without padding, one shorter than an SDAR block
STOP = 2  # the EOS id: stops some SDAR rows early (checked below), not all

CASES = {
    "sdar": ("sdar", BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=12, rule="dynamic", tau=0.5,
                                       temperature=1.0, stop_ids=(STOP,))),
    # fast_dllm_threshold: float64 confidence, so generate must trace under x64 as llada.generate does
    "llada": ("llada", LLaDADecodeConfig(gen_length=8, block_length=4, steps=8, rule="fast_dllm_threshold", tau=0.5,
                                         temperature=1.0)),
    "dream": ("dream", DreamDecodeConfig(max_new_tokens=8, steps=4, alg="maskgit_plus", rule="dynamic", tau=0.5,
                                         temperature=1.0)),
    "dream_cache": ("dream", DreamCacheDecodeConfig(max_new_tokens=8, block_length=4, steps=8, cache="dual", tau=0.5,
                                                    temperature=1.0)),
}


class _Params(dict):
    def __missing__(self, family):  # built on first use: a family's init compiles
        self[family] = W.params(family)
        return self[family]


@pytest.fixture(scope="module")
def models():
    return _Params()


def _old(name, dc, cfg, params, key):
    """The decoder's own entry point with its own prompt convention; pads hold 0 (junk 9 in the api call)."""
    left, aligned, lens = W.prompts(LENGTHS)
    valid = np.arange(left.shape[1])[None] >= (left.shape[1] - lens)[:, None]  # NumPy, independent of the api
    left0 = np.where(valid, left, 0)
    if name == "sdar":
        return block_generate(cfg, dc, params, aligned, lens, key)
    if name == "llada":
        return llada_generate(cfg, dc, params, left0, valid, key)
    fn = block_generate_cached if name == "dream_cache" else diffusion_generate
    return fn(cfg, dc, params, left0, valid, key)


def _check_consistent(ro: api.Rollout, pad_id: int, fixed_canvas: bool):
    """The Rollout's fields agree with each other, recomputed in NumPy."""
    b, g = ro.tokens.shape
    kept = np.arange(g)[None] < ro.lengths[:, None]
    np.testing.assert_array_equal(np.asarray(ro.kept), kept)
    if fixed_canvas:
        assert (ro.lengths == g).all()
    assert (ro.tokens[~kept] == pad_id).all() and (ro.step_map[~kept] == 0).all() and (ro.conf[~kept] == 0).all()
    dec = kept & (ro.step_map > 0)
    for i in range(b):
        steps = ro.step_map[i][dec[i]]
        tpf = len(steps) / len(np.unique(steps)) if len(steps) else 0.0
        np.testing.assert_allclose(ro.tpf[i], tpf, rtol=1e-6, err_msg=f"row {i}")
        assert steps.max(initial=0) <= ro.n_steps[i] <= ro.commits_per_step.shape[1]
        # every kept token is counted at its step (cut tokens after a stop id are counted too, hence >=)
        per_step = np.bincount(steps, minlength=ro.commits_per_step.shape[1] + 1)[1:]
        assert (ro.commits_per_step[i] >= per_step).all(), i
        e = np.zeros(ro.ewc_per_step.shape[1])
        np.add.at(e, steps - 1, 1.0 - ro.conf[i][dec[i]])
        assert (ro.ewc_per_step[i] >= e - 1e-5).all(), i
    np.testing.assert_allclose(ro.ewc_sum, np.where(dec, 1.0 - ro.conf, 0.0).sum(1), rtol=1e-5, atol=1e-5)
    assert ((ro.conf >= 0) & (ro.conf <= 1)).all() and (ro.n_forwards >= ro.n_steps).all()
    if ro.n_save is not None:
        np.testing.assert_array_equal(ro.n_forwards, ro.n_steps + ro.n_save)
    if ro.n_full is not None:
        assert (ro.n_full <= ro.n_steps).all()


@pytest.mark.parametrize("case,unstacked", [("sdar", False), ("sdar", True), ("llada", False), ("dream", False),
                                            ("dream_cache", False)])
def test_generate_equals_old_entry_point(models, case, unstacked):
    family, dc = CASES[case]
    cfg, params = W.MODELS[family], models[family]
    key = jax.random.key(11)
    left, _, lens = W.prompts(LENGTHS)
    ro = jax.device_get(api.generate(dc, cfg, M.unstack_layers(params) if unstacked else params, left, lens, key))
    old = jax.device_get(_old(case, dc, cfg, params, key))
    assert isinstance(ro, api.Rollout)
    same = {"tokens": "tokens", "step_map": "step_map", "conf": "conf", "commits_per_step": "commits_per_step",
            "tpf": "tpf", "ewc_sum": "ewc"}
    if case == "sdar":
        same.update(lengths="lengths", ewc_per_step="ewc_per_step", n_steps="n_denoise", n_save="n_save")
        np.testing.assert_array_equal(ro.n_forwards, old["n_denoise"] + old["n_save"])
        assert ro.n_full is None
        assert (ro.lengths < dc.max_new_tokens).any() and (ro.lengths == dc.max_new_tokens).any()  # per-row stops
    else:
        same.update(n_steps="n_forward", n_forwards="n_forward")
        if case != "llada":
            same.update(ewc_per_step="ewc_per_step")
        if case == "dream_cache":
            same.update(n_full="n_full")
        assert ro.n_save is None and (ro.n_full is None) == (case != "dream_cache")
    for field, key_old in same.items():
        if unstacked and field in ("conf", "ewc_per_step", "ewc_sum"):  # the unrolled layer loop rounds differently
            np.testing.assert_allclose(getattr(ro, field), old[key_old], atol=2e-5, err_msg=field)
        else:
            np.testing.assert_array_equal(getattr(ro, field), old[key_old], err_msg=field)
    if case == "llada":  # derived from the step map: every commit is kept, each slot committed once
        np.testing.assert_allclose(ro.ewc_per_step.sum(1), old["ewc"], rtol=1e-5)
        np.testing.assert_array_equal((ro.ewc_per_step > 0).sum(1) <= (ro.commits_per_step > 0).sum(1), True)
    assert (ro.tpf > 1).any()  # several tokens per step happen: the rules (and step maps) are really exercised
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.mask_token_id
    _check_consistent(ro, pad, fixed_canvas=case != "sdar")


def test_prompt_conventions():
    left, aligned, lens = W.prompts([3, 1, 4], width=5)
    np.testing.assert_array_equal(np.asarray(api.left_aligned(left, lens))[:, :4] * (np.arange(4) < lens[:, None]),
                                  aligned[:, :4])
    np.testing.assert_array_equal(np.asarray(api.left_pad_valid(lens, 5)), left != 9)


def test_dispatch_and_errors(models):
    assert api.decoder_name(api.decoder_config("sdar", block_size=4, steps=2)) == "sdar"
    assert isinstance(api.decoder_config("dream", cache="dual", max_new_tokens=8, block_length=4, steps=8),
                      DreamCacheDecodeConfig)
    assert type(api.decoder_config("dream", cache="none")) is DreamDecodeConfig
    assert api.decoder_name(LLaDADecodeConfig()) == "llada"
    left, _, lens = W.prompts([2, 3])
    with pytest.raises(TypeError, match="not a decoder config: dict"):
        api.generate({}, W.MODELS["sdar"], models["sdar"], left, lens, jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompt_lens must lie in \[0, P=3\]"):
        api.generate(CASES["sdar"][1], W.MODELS["sdar"], models["sdar"], left, np.array([2, 4]), jax.random.key(0))
    with pytest.raises(ValueError, match="prompts must be"):
        api.generate(CASES["sdar"][1], W.MODELS["sdar"], models["sdar"], left, lens[:1], jax.random.key(0))


@pytest.mark.slow
def test_mesh_of_8_devices_gives_the_tokens_of_one():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tests.workers.decode_mesh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["case"]: r for r in (json.loads(x) for x in out.stdout.splitlines() if x.startswith("{"))}
    for case in ("sdar", "dream"):
        r = rows[case]
        assert r["differ"] == [], r  # tokens, lengths, step maps, commit counts, forwards, TPF: identical
        assert max(r["float_err"].values()) < 1e-4, r  # confidences: per-device programs round differently
        assert r["spec"] == "PartitionSpec('data',)" or r["spec"] == "P('data',)", r  # really split over 8
        assert r["n_devices"] == 8
    assert len(set(rows["sdar"]["lengths"])) > 1  # rows stop at different blocks
    assert "not a multiple of the mesh's data x fsdp = 8" in rows["indivisible"]["error"]
