"""Run in a subprocess with JAX_NUM_CPU_DEVICES=8: the train step on a 2x2x2 (data, fsdp, tensor) mesh vs one device.

Prints one JSON line per case: max relative difference of losses and params after a few steps, and the specs of the
sharded params (to show the rules really split them).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.config import ModelConfig
from dlmjax.model.transformer import init_params
from dlmjax import sharding as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.objectives import make_objective

B, L, V = 8, 16, 64


def tiny(family):
    if family == "sdar":
        return ModelConfig(family="sdar", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, qk_norm=True,
                           attention="block_causal", block_size=4, mask_token_id=V - 1, eos_token_id=1)
    return ModelConfig(family="llada", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                       head_dim=8, intermediate_size=48, rms_norm_eps=1e-5, rope_theta=1e4,
                       attention="bidirectional", mask_token_id=V - 1, eos_token_id=1)


def batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, V - 1, (B, L)).astype(np.int32)
    plen = rng.integers(2, 6, B)
    length = rng.integers(10, L + 1, B).astype(np.int32)
    ar = np.arange(L)[None]
    ids = np.where(ar < length[:, None], ids, 1)
    maskable = ar >= plen[:, None]
    bucket = np.where(maskable, np.where(ar < length[:, None], rng.integers(1, 9, (B, L)), 8), 0).astype(np.int8)
    return {"input_ids": ids, "maskable": maskable, "length": length, "bucket": bucket}


def init_train(devices, mc, lc, cfg, opt):
    """(mesh, tx, combine, state, state_sh, frozen, frozen_sh) of a fresh tiny model on `devices` (LoRA adapters
    nudged off zero so they matter from step 0); shared with the RL mesh worker."""
    mesh = mesh_lib.make_mesh(mc, devices)
    params = init_params(cfg, jax.random.key(0))
    tx = step_lib.make_optimizer(opt)
    split, combine = step_lib.trainable_view(lc, params)
    trainable, frozen = split(params, jax.random.key(1))
    if lc.rank:  # non-zero B so the adapters matter from step 0
        trainable = jax.tree.map(lambda x: x + 0.01, trainable)
    state, state_sh = step_lib.init_state(mesh, tx, trainable)
    frozen_sh = None
    if frozen is not None:
        frozen_sh = mesh_lib.shardings(mesh, mesh_lib.param_specs(mesh, frozen))
        frozen = jax.device_put(frozen, frozen_sh)
    return mesh, tx, combine, state, state_sh, frozen, frozen_sh


def run(devices, mc, oc, lc, sc, cfg, n_steps=3):
    opt = OptimConfig(lr=3e-3, total_steps=10, warmup_steps=2, weight_decay=0.01)
    mesh, tx, combine, state, state_sh, frozen, frozen_sh = init_train(devices, mc, lc, cfg, opt)
    b0 = batch(0)
    batch_sh = mesh_lib.batch_shardings(mesh, b0)
    obj = make_objective(cfg, oc, sc.global_batch, mesh)
    fn = step_lib.make_train_step(obj, sc, opt, tx, combine, mesh, state_sh, frozen_sh, batch_sh)
    noised = step_lib.make_add_noise(mesh)
    losses = []
    for i in range(n_steps):
        b = noised(jax.device_put(batch(i), batch_sh), step_lib.step_noise(42, i))
        state, m = fn(state, frozen, b)
        losses.append(float(m["loss"]))
    specs = {k: str(v.sharding.spec) for k, v in state["params"].get("layers", {}).items()} if not lc.rank else {}
    return losses, jax.tree.map(np.asarray, state["params"]), specs


def main():
    assert jax.device_count() == 8, jax.device_count()
    cases = [("mdlm", 0, 1), ("mdlm", 0, 2), ("mdlm", 4, 2), ("bd3lm", 0, 2), ("bd3lm", 4, 1), ("trims", 0, 2),
             ("trims", 4, 1)]
    if len(sys.argv) > 1:
        cases = [c for c in cases if c[0] in sys.argv[1:]]
    for kind, rank, accum in cases:
        cfg = tiny("sdar" if kind == "bd3lm" else "llada")
        oc = ObjectiveConfig(kind=kind, block_size=4)
        lc = LoRAConfig(rank=rank, alpha=8.0)
        sc = StepConfig(global_batch=B, grad_accum=accum)
        l1, p1, _ = run(jax.devices()[:1], MeshConfig(), oc, lc, sc, cfg)
        l8, p8, specs = run(jax.devices(), MeshConfig(data=2, fsdp=2, tensor=2), oc, lc, sc, cfg)
        dp = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
                 for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        moved = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p1))
        print(json.dumps({"case": [kind, rank, accum], "loss1": l1, "loss8": l8, "param_rel_diff": dp,
                          "specs": specs, "max_param": moved}), flush=True)


if __name__ == "__main__":
    main()
