"""Run with JAX_NUM_CPU_DEVICES=8: RL updates (old-policy pass + minibatch steps of an RL objective) on a 2x2x2
(data, fsdp, tensor) mesh vs one device, with and without LoRA and gradient accumulation. One JSON line per case."""

import json
import sys

import jax
import numpy as np

from dlmjax import sharding as mesh_lib
from dlmjax.rl.batch import build_rows, make_batch, split_minibatches
from dlmjax.rl.config import RLObjectiveConfig
from dlmjax.rl.layout import pack_rollouts
from dlmjax.rl.objectives import make_rl_objective
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, OptimConfig, StepConfig
from tests.workers.sharded_step import V, init_train, tiny

K, MB = 4, 8


def rollouts(seed=0, n=8):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, V - 2, int(rng.integers(3, 9))).tolist() for _ in range(n)]
    responses = [rng.integers(2, V - 2, int(rng.integers(4, 11))).tolist() for _ in range(n)]
    steps = [np.sort(rng.integers(1, 6, len(r))).tolist() for r in responses]
    return pack_rollouts(prompts, responses, 1, step_maps=steps), rng.normal(size=n).astype(np.float32)


def run(devices, mc, rc, lc, accum):
    cfg = tiny("sdar")
    # a large Adam eps keeps updates proportional to the gradient (1e-8 makes them ~sign(g), which amplifies the
    # float-rounding differences of near-zero gradient entries between the two layouts)
    opt = OptimConfig(lr=3e-3, total_steps=10, schedule="constant", eps=1e-3)
    mesh, tx, combine, state, state_sh, frozen, frozen_sh = init_train(devices, mc, lc, cfg, opt)
    obj = make_rl_objective(cfg, rc, mesh)
    fn = step_lib.make_train_step(obj, StepConfig(global_batch=MB, grad_accum=accum), opt, tx, combine, mesh,
                                  state_sh, frozen_sh, None)
    lp = step_lib.make_token_logprobs(obj, combine, mesh, state_sh["params"], frozen_sh)
    packed, adv = rollouts()
    rows = build_rows(rc, packed, cfg.mask_token_id, np.random.default_rng(5))
    minis = split_minibatches(make_batch(packed, rows, adv, MB), MB)
    placed = []
    for mb in minis:
        g = mesh_lib.global_batch(mesh, mb)
        placed.append({**g, "logp_old": lp(state["params"], frozen, g)})
    losses = []
    for mb in placed:
        state, m = fn(state, frozen, mb)
        losses.append(float(m["loss"]))
    return losses, jax.tree.map(np.asarray, state["params"]), len(rows)


def main():
    assert jax.device_count() == 8, jax.device_count()
    cases = [("slim", 0, 1), ("slim", 4, 2), ("tracerl", 0, 2), ("random", 4, 1)]
    for objective, rank, accum in cases:
        rc = RLObjectiveConfig(objective=objective, block_size=K, head_rows=0)
        lc = LoRAConfig(rank=rank, alpha=8.0)
        l1, p1, n1 = run(jax.devices()[:1], MeshConfig(), rc, lc, accum)
        l8, p8, n8 = run(jax.devices(), MeshConfig(data=2, fsdp=2, tensor=2), rc, lc, accum)
        dp = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
                 for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        print(json.dumps({"case": [objective, rank, accum], "loss1": l1, "loss8": l8, "param_rel_diff": dp,
                          "rows": [n1, n8]}), flush=True)


if __name__ == "__main__":
    main()
