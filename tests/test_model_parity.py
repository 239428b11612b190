"""Our forward vs `transformers` Llama / Qwen2 / Qwen3 holding the same weights, with the family's mask (spec §9.1)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax import model as M
from dlmjax.checkpoint import load_checkpoint
from tests.reference import hf_models as R

B, L = 3, 13


def _batch(vocab, seed=0, pad_left=(0, 4, 0), pad_right=(0, 0, 3)):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 1, (B, L))
    valid = np.ones((B, L), bool)
    for b in range(B):
        valid[b, :pad_left[b]] = False
        if pad_right[b]:
            valid[b, L - pad_right[b]:] = False
    tokens = np.where(valid, tokens, 1)
    return tokens, valid


def _ours(ckpt, tokens, valid, dtype=None, unstacked=False):
    cfg, params = load_checkpoint(ckpt, dtype=dtype, **({"compute_dtype": dtype} if dtype else {}))
    params = M.unstack_layers(params) if unstacked else params
    t, v = jnp.asarray(tokens, jnp.int32), jnp.asarray(valid)
    pos = M.default_positions(cfg, v)
    logits = M.forward_jit(cfg, params, t, pos, M.default_mask(cfg, v, pos))
    return cfg, np.asarray(logits.astype(jnp.float32))


def _reference(family, model, tokens, valid, block=4):
    if family == "llada":
        return R.hf_logits(model, tokens, R.llada_allowed(valid))
    if family == "dream":
        return R.hf_logits(model, tokens, R.dream_allowed(valid), R.dream_position_ids(valid))
    if family == "sdar":
        return R.hf_logits(model, tokens, R.block_causal_allowed(valid, block))
    return R.hf_logits(model, tokens, R.causal_allowed(valid))


def _rows(family, valid):
    """Query rows whose output is defined by the reference (pad queries of Dream / causal see no key there)."""
    if family == "llada":
        return np.ones_like(valid)
    return valid


FAMILIES = ["llada", "dream", "sdar", "llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match_transformers(family, layers, imported):
    """Both layer loops: stacked params under lax.scan, and unstacked params in an unrolled loop."""
    model, ckpt, raw, _ = imported(family)
    tokens, valid = _batch(raw.get("vocab_size") or raw["embedding_size"])
    cfg, ours = _ours(ckpt, tokens, valid, unstacked=layers == "unrolled")
    ref = _reference(family, model, tokens, valid)
    rows = _rows(family, valid)
    scale = np.abs(ref[rows]).max()
    assert scale > 1.0  # the random model is far from uniform: a wrong mask or rope would show
    err = np.abs(ours[rows] - ref[rows]).max()
    assert err <= 1e-4 * scale, f"{family}: max abs diff {err:.3g} vs logit scale {scale:.3g}"
    assert np.isfinite(ours).all()  # also the pad rows (zeros from fully-masked attention, never NaN)


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_tied_embeddings_match(family, imported):
    model, ckpt, raw, _ = imported(family, tie=True)
    tokens, valid = _batch(raw.get("vocab_size") or raw["embedding_size"], seed=3)
    cfg, ours = _ours(ckpt, tokens, valid)
    assert cfg.tie_word_embeddings
    ref = _reference(family, model, tokens, valid)
    rows = _rows(family, valid)
    assert np.abs(ours[rows] - ref[rows]).max() <= 1e-4 * np.abs(ref[rows]).max()


def test_mask_matters(imported):
    """A wrong mask must be detectable: causal attention on the LLaDA model differs from the reference."""
    model, ckpt, raw, _ = imported("llada")
    tokens, valid = _batch(raw["embedding_size"])
    cfg, params = load_checkpoint(ckpt)
    t, v = jnp.asarray(tokens, jnp.int32), jnp.asarray(valid)
    pos = M.default_positions(cfg, v)
    wrong = np.asarray(M.forward(cfg, params, t, pos, M.causal_mask(v)))
    ref = _reference("llada", model, tokens, valid)
    assert np.abs(wrong - ref).max() > 1e-2


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_bf16_argmax_agrees(family, layers, imported):
    """bf16 params + bf16 compute vs the transformers model in bf16: argmax agrees wherever the f32 reference has a
    clear top-1 (margin above 2% of the logit scale); near-ties may flip under different rounding."""
    model, ckpt, raw, _ = imported(family)
    tokens, valid = _batch(raw.get("vocab_size") or raw["embedding_size"], seed=1)
    ref32 = _reference(family, model, tokens, valid)
    ref16 = _reference(family, copy.deepcopy(model).to(torch.bfloat16), tokens, valid)  # never touch the shared model
    _, ours = _ours(ckpt, tokens, valid, dtype="bfloat16", unstacked=layers == "unrolled")
    rows = _rows(family, valid)
    top2 = np.sort(ref32, axis=-1)[..., -2:]
    clear = rows & ((top2[..., 1] - top2[..., 0]) > 0.02 * np.abs(ref32[rows]).max())
    assert clear.sum() >= 0.5 * rows.sum()
    agree = ours.argmax(-1) == ref16.argmax(-1)
    assert agree[clear].all(), f"{family}: bf16 argmax differs at {np.argwhere(clear & ~agree).tolist()}"
    assert (ours.argmax(-1) == ref32.argmax(-1))[clear].all()


def test_shift_logits_is_dream_alignment():
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    s = np.asarray(M.shift_logits(x))
    x = np.asarray(x)
    np.testing.assert_array_equal(s[:, 0], x[:, 0])
    np.testing.assert_array_equal(s[:, 1:], x[:, :-1])
