"""The unrolled layer loop (unstacked params, per-layer KV cache) against the scanned one.

Parity of the unrolled forward with transformers itself is in test_model_parity (both layer loops); here: the
stack/unstack round trip, cached decoding, gradients, every decoder giving identical results, and the in-place
per-layer cache write.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.decode import ar
from dlmjax.decode.dream import DreamDecodeConfig, diffusion_generate
from dlmjax.decode.llada import LLaDADecodeConfig, generate
from dlmjax.decode.sdar import BlockDecodeConfig, block_generate

BASE = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, mask_token_id=63, eos_token_id=2)
SDAR = ModelConfig(family="sdar", qk_norm=True, attention="block_causal", block_size=4, **BASE)
LLADA = ModelConfig(family="llada", attention="bidirectional", rope_full_precision=True, **BASE)
DREAM = ModelConfig(family="dream", attention="bidirectional", qkv_bias=True, logit_shift=True, **BASE)
QWEN3 = ModelConfig(family="qwen3", qk_norm=True, **BASE)


def _params(cfg, seed=0):
    # a peaked random model (large final norm), so greedy choices are far from ties
    p = M.init_params(cfg, jax.random.key(seed), std=0.3)
    return {**p, "final_norm": p["final_norm"] * 8.0}


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unstack_round_trip_and_layout():
    p = _params(DREAM)
    u = M.unstack_layers(p)
    assert M.is_unstacked(u) and not M.is_unstacked(p) and isinstance(p["layers"], dict)  # input untouched
    assert len(u["layers"]) == DREAM.num_layers
    np.testing.assert_array_equal(np.asarray(u["layers"][1]["wq"]), np.asarray(p["layers"]["wq"][1]))
    _tree_equal(M.stack_layers(u), p)
    assert M.unstack_layers(u) is u and M.stack_layers(p) is p


@pytest.mark.parametrize("starts", [(8, 8), (4, 8)])
def test_cached_steps_equal_scan(starts):
    """Prefill + a block step (scalar or per-row write index): unrolled logits and cache equal the scanned ones."""
    cfg, b, lmax, k = SDAR, 2, 20, SDAR.block_size
    p = _params(cfg)
    u = M.unstack_layers(p)
    tokens = jax.random.randint(jax.random.key(1), (b, 12), 0, cfg.vocab_size)
    slots = jnp.broadcast_to(jnp.arange(lmax), (b, lmax))
    pos = slots[:, :8]
    outs = []
    for params in (p, u):
        cache = M.init_cache(cfg, b, lmax, per_layer=M.is_unstacked(params))
        l0, cache = M.forward(cfg, params, tokens[:, :8], pos, M.block_causal_mask(pos, slots, k), cache, 0)
        cache = {**cache, "valid": slots < jnp.asarray(starts)[:, None]}
        idx = jnp.asarray(starts)[:, None] + jnp.arange(k)
        xb = jnp.take_along_axis(tokens, idx, axis=1)
        l1, cache = M.forward(cfg, params, xb, idx, M.block_causal_mask(idx, slots, k), cache, jnp.asarray(starts))
        stacked_k = cache["k"] if not M.is_unstacked(params) else jnp.stack(cache["k"])
        outs.append((l0, l1, stacked_k, cache["valid"]))
    for a, c in zip(outs[0], outs[1]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(outs[1][2][:, :, :, 8:12]).max()) > 0  # the step's K/V were written


@pytest.mark.parametrize("remat", ["none", "full"])
def test_grads_equal_scan(remat):
    cfg = LLADA.replace(remat=remat)
    p = _params(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))

    def loss(params):
        lg = M.forward(cfg, params, tokens, pos, None)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[..., None], -1))

    g_scan = jax.grad(loss)(p)
    g_unr = M.stack_layers(jax.grad(loss)(M.unstack_layers(p)))
    for a, c in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_unr)):  # f32 sums in another order: 1e-5 of scale
        scale = float(jnp.abs(a).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5 * scale, rtol=1e-4)


def test_per_layer_cache_written_in_place():
    """A donated per-layer cache is updated in place: no cache-sized copy in the compiled forward (a scan, or a
    write XLA cannot order after the reads, copies every layer's buffer)."""
    cfg, b, lmax, k = SDAR, 1, 64, SDAR.block_size
    u = M.unstack_layers(_params(cfg))
    cache = M.init_cache(cfg, b, lmax, per_layer=True)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, xb, start):
        idx = start[:, None] + jnp.arange(k)
        slots = jnp.broadcast_to(jnp.arange(lmax), (b, lmax))
        return M.forward(cfg, params, xb, idx, M.block_causal_mask(idx, slots, k), cache, start)

    hlo = step.lower(u, cache, jnp.zeros((b, k), jnp.int32), jnp.full((b,), 8, jnp.int32)).compile().as_text()
    shape = f"f32[{b},{cfg.num_kv_heads},{lmax},{cfg.head_dim}]"
    copies = [ln for ln in hlo.splitlines() if " copy(" in ln and shape in ln.split("=")[1].split("copy(")[0]]
    assert not copies, copies[:2]


def _same(out_a, out_b, keys):
    for key in keys:
        np.testing.assert_array_equal(np.asarray(out_a[key]), np.asarray(out_b[key]), err_msg=key)


@pytest.mark.parametrize("rule", ["tau_budget", "dynamic"])
def test_sdar_decoding_identical(rule):
    p = _params(SDAR)
    prompts = jax.random.randint(jax.random.key(3), (2, 7), 3, 60)
    lens = jnp.array([7, 5])
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=12, rule=rule, tau=0.5, temperature=1.0)
    a = block_generate(SDAR, dc, p, prompts, lens, jax.random.key(4))
    c = block_generate(SDAR, dc, M.unstack_layers(p), prompts, lens, jax.random.key(4))
    _same(a, c, ("tokens", "step_map", "n_denoise", "n_save"))
    assert int(a["n_save"].sum()) > 0


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_llada_decoding_identical(cache):
    p = _params(LLADA)
    prompts = jax.random.randint(jax.random.key(5), (2, 6), 3, 60)
    valid = jnp.array([[True] * 6, [False] * 2 + [True] * 4])
    dc = LLaDADecodeConfig(gen_length=8, block_length=4, steps=8, rule="low_confidence", cache=cache)
    a = generate(LLADA, dc, p, prompts, valid, jax.random.key(6))
    c = generate(LLADA, dc, M.unstack_layers(p), prompts, valid, jax.random.key(6))
    _same(a, c, ("tokens", "step_map"))


def test_dream_and_ar_decoding_identical():
    p = _params(DREAM)
    prompts = jax.random.randint(jax.random.key(7), (2, 5), 3, 60)
    valid = jnp.array([[True] * 5, [False] + [True] * 4])
    dc = DreamDecodeConfig(max_new_tokens=8, steps=8, alg="entropy")
    a = diffusion_generate(DREAM, dc, p, prompts, valid, jax.random.key(8))
    c = diffusion_generate(DREAM, dc, M.unstack_layers(p), prompts, valid, jax.random.key(8))
    _same(a, c, ("tokens", "step_map"))
    q = _params(QWEN3)
    np.testing.assert_array_equal(np.asarray(ar.greedy_generate(QWEN3, q, prompts, 6)),
                                  np.asarray(ar.greedy_generate(QWEN3, M.unstack_layers(q), prompts, 6)))


def test_decode_job_layer_loops_agree(imported, tmp_path):
    """The decode job's --layer_loop: scan and unrolled write identical records; a bad value names the flag."""
    import json

    from dlmjax.decode import job as J

    _, ckpt, _, _ = imported("sdar")
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [3, 17, 22, 9, 41]}\n{"prompt_ids": [8, 8, 30]}\n')
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=8, rule="tau_budget", tau=0.3, greedy=True)
    recs = {}
    for loop in ("scan", "unrolled"):
        out = tmp_path / f"{loop}.jsonl"
        J.run(J.DecodeJobConfig(ckpt=ckpt, prompts=str(tmp_path / "p.jsonl"), out=str(out), decoder="sdar",
                                batch_size=2, chat_template=False, layer_loop=loop), dc, log=lambda *_: None)
        recs[loop] = [{k: v for k, v in json.loads(x).items() if k in ("ids", "step_map", "tpf")}
                      for x in out.read_text().splitlines()]
    assert recs["scan"] == recs["unrolled"] and len(recs["scan"]) == 2
    assert J.unrolled_layers("auto") == (jax.default_backend() == "cpu") and not J.unrolled_layers("scan")
    with pytest.raises(ValueError, match="--layer_loop='stacked'"):
        J.DecodeJobConfig(ckpt=ckpt, prompts="p", out="o", decoder="sdar", layer_loop="stacked")
