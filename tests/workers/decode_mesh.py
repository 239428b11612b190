"""Tiny decoder models and batches for tests/test_decode_api.py, and its mesh worker.

Run as a module in a subprocess with JAX_NUM_CPU_DEVICES=8: `decode.api.generate` on an 8-way data mesh vs one
device, for SDAR (sampled, per-row stopping) and Dream (sampled, the batch-mean schedule couples the rows). Prints one
JSON line per case: whether every Rollout field is identical, and the tokens' sharding spec.
"""

import json

import jax
import numpy as np

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.decode.dream import DreamDecodeConfig
from dlmjax.decode.sdar import BlockDecodeConfig

BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, mask_token_id=63, eos_token_id=2)
MODELS = {
    "sdar": ModelConfig(family="sdar", qk_norm=True, attention="block_causal", block_size=4, **BASE),
    "llada": ModelConfig(family="llada", attention="bidirectional", rope_full_precision=True, **BASE),
    "dream": ModelConfig(family="dream", attention="bidirectional", qkv_bias=True, logit_shift=True, **BASE),
}


def params(family: str, seed: int = 0):
    """Random params made peaked (large final norm), so confidences spread and thresholds matter."""
    p = M.init_params(MODELS[family], jax.random.key(seed), std=0.3)
    return {**p, "final_norm": p["final_norm"] * 8.0}


def prompts(lengths, width=None, seed=0, pad=9):
    """Left-padded [B, width] ids (pad columns hold `pad`), the left-aligned twin (zeros after), lengths [B]."""
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    left = np.full((len(lengths), width), pad, np.int32)
    aligned = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids = rng.integers(3, 60, n)
        left[i, width - n:], aligned[i, :n] = ids, ids
    return left, aligned, np.asarray(lengths, np.int32)


def main():
    from dlmjax import sharding
    from dlmjax.decode import api

    assert jax.device_count() == 8, jax.device_count()
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    left, _, lens = prompts([7, 5, 2, 6, 3, 8, 1, 4], width=8, seed=1)
    cases = {
        "sdar": BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=12, rule="dynamic", tau=0.5,
                                  temperature=1.0, stop_ids=(17,)),
        "dream": DreamDecodeConfig(max_new_tokens=8, steps=4, alg="maskgit_plus", temperature=1.0),
    }
    for name, dc in cases.items():
        p = params(name)
        one = jax.device_get(api.generate(dc, MODELS[name], p, left, lens, jax.random.key(3)))
        sharded = api.generate(dc, MODELS[name], p, left, lens, jax.random.key(3), mesh=mesh)
        spec = str(sharded.tokens.sharding.spec)
        eight = jax.device_get(sharded)
        diff = [f for f in ("tokens", "lengths", "step_map", "commits_per_step", "n_steps", "n_forwards", "tpf")
                if not np.array_equal(getattr(one, f), getattr(eight, f))]
        # float fields: the per-device program (batch 1) may fuse / vectorise differently from the batch-8 one
        err = {f: float(np.max(np.abs(getattr(one, f) - getattr(eight, f))))
               for f in ("conf", "ewc_per_step", "ewc_sum")}
        print(json.dumps({"case": name, "differ": diff, "float_err": err, "spec": spec, "lengths": one.lengths.tolist(),
                          "n_devices": len(sharded.tokens.sharding.device_set)}), flush=True)
    try:
        api.generate(cases["sdar"], MODELS["sdar"], params("sdar"), left[:6], lens[:6], jax.random.key(3), mesh=mesh)
        print(json.dumps({"case": "indivisible", "error": None}))
    except ValueError as e:
        print(json.dumps({"case": "indivisible", "error": str(e)}))


if __name__ == "__main__":
    main()
