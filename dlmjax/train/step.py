"""The generic sharded train step: micro-batched gradient accumulation, AdamW, one jit with donated state.

state = {"step": int32 [], "params": trainable pytree (full params, or the LoRA adapters), "opt_state": optax state}
frozen = the base params under LoRA (never updated, never donated), else None.

The step knows the objective only through its contract (train/objective.py): `loss_fn(params, batch) -> (loss,
sums)`, the batch keys it reads, `metrics(sums)` and how micro-batch losses combine (`reduce`). SFT objectives use
HF Trainer + dLLM semantics, the mean over micro-batches of each micro-batch's normalised loss (spec trims_mdlm.md
§3.3, "effective normalisation"); RL objectives are pre-normalised sums. Noise lives in the batch (add_noise), so the
step is a pure function of (state, frozen, batch).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dlmjax.train import lora as lora_lib
from dlmjax import sharding as mesh_lib
from dlmjax.train.config import LoRAConfig, OptimConfig, StepConfig
from dlmjax.train.objective import Objective, add_noise

F32 = jnp.float32


def lr_schedule(oc: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay to lr * end_lr_ratio at total_steps, or constant."""
    end = oc.lr * oc.end_lr_ratio
    decay = max(oc.total_steps - oc.warmup_steps, 1)
    if oc.schedule == "cosine":
        main = optax.cosine_decay_schedule(oc.lr, decay, alpha=oc.end_lr_ratio)
    elif oc.schedule == "linear":
        main = optax.linear_schedule(oc.lr, end, decay)
    else:
        main = optax.constant_schedule(oc.lr)
    if oc.warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, oc.lr, oc.warmup_steps), main], [oc.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only (HF Trainer excludes biases and norm weights)."""
    def keep(path, _):
        name = path[-1].key
        return not (name.endswith("norm") or name in ("bq", "bk", "bv"))
    return jax.tree.map_with_path(keep, params)


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(oc.clip_norm)] if oc.clip_norm > 0 else []
    parts.append(optax.adamw(lr_schedule(oc), b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts)


def trainable_view(lc: LoRAConfig, params) -> tuple[Callable, Callable]:
    """(split, combine): split(params, key) -> (trainable, frozen); combine(trainable, frozen) -> model params."""
    if lc.rank == 0:
        return (lambda p, key: (p, None)), (lambda t, f: t)
    return ((lambda p, key: (lora_lib.init_lora(lc, p["layers"], key), p)),
            (lambda t, f: lora_lib.merge(lc, f, t)))


def state_specs(mesh, tx, trainable_abstract) -> dict:
    """PartitionSpecs of the whole state: params by rule, optimizer moments like their params, counters replicated."""
    pspecs = mesh_lib.param_specs(mesh, trainable_abstract)
    opt_abstract = jax.eval_shape(tx.init, trainable_abstract)
    ospecs = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, pspecs,
                                   transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    return {"step": P(), "params": pspecs, "opt_state": ospecs}


def init_state(mesh, tx, trainable) -> tuple[dict, dict]:
    """(sharded state, its NamedShardings). `trainable` may live anywhere; it is placed by the rules."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    sh = mesh_lib.shardings(mesh, state_specs(mesh, tx, abstract))
    make = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                   out_shardings=sh)
    return make(jax.device_put(trainable, sh["params"])), sh


def _microbatches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [A, B/A, ...] with micro-batch m = rows {j * A + m}: each device keeps its rows (no reshuffle)."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def objective_batch_shardings(objective: Objective, mesh, batch: dict, batch_sh: dict | None = None) -> dict:
    """NamedShardings of every key the objective reads: those given in `batch_sh`, the rest split over the batch axes
    by the rank of the batch's array."""
    given = dict(batch_sh or {})
    return {k: given.get(k) or NamedSharding(mesh, mesh_lib.batch_spec(mesh, np.ndim(batch[k])))
            for k in objective.batch_keys}


def _per_batch_layout(objective: Objective, mesh, batch_sh, build):
    """fn(*args, batch) that keeps only the objective's keys and jits `build(shardings)` once per batch layout.
    fn.jitted(batch) gives the jitted function itself (to lower / compile ahead, as the benchmarks do)."""
    cache = {}

    def jitted(batch):
        sh = objective_batch_shardings(objective, mesh, batch, batch_sh)
        sig = tuple((k, str(v.spec)) for k, v in sh.items())
        if sig not in cache:
            cache[sig] = build(sh)
        return cache[sig]

    def fn(a, b, batch):
        batch = {k: batch[k] for k in objective.batch_keys}
        return jitted(batch)(a, b, batch)

    fn.jitted = lambda batch: jitted({k: batch[k] for k in objective.batch_keys})
    fn.keys = objective.batch_keys
    return fn


def make_train_step(objective: Objective, sc: StepConfig, oc: OptimConfig, tx, combine, mesh, state_sh, frozen_sh,
                    batch_sh):
    """jit(step)(state, frozen, batch) -> (state, metrics); state donated, shardings fixed in and out. The batch holds
    objective.batch_keys (noise included; other keys are ignored); batch_sh: shardings of some of those keys (the
    rest split over the batch axes by rank)."""
    accum = sc.grad_accum
    sched = lr_schedule(oc)
    scale = 1.0 / accum if objective.reduce == "mean" else 1.0
    rep = mesh_lib.replicated(mesh)

    def build(batch_sh):
        bspec = {k: s.spec for k, s in batch_sh.items()}
        return jax.jit(functools.partial(step, bspec), in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(state_sh, rep), donate_argnums=(0,))

    def step(bspec, state, frozen, batch):
        micro = _microbatches(batch, accum)

        def loss_of(trainable, mb):
            return objective.loss_fn(combine(trainable, frozen), mb)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def body(carry, mb):
            g_acc, l_acc, s_acc = carry
            mb = {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, P(*bspec[k]))) for k, v in mb.items()}
            (loss, sums), g = grad_fn(state["params"], mb)
            g_acc = jax.tree.map(lambda a, x: a + x.astype(F32), g_acc, g)
            s_acc = jax.tree.map(jnp.add, s_acc, sums) if s_acc is not None else sums
            return (g_acc, l_acc + loss, s_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), state["params"])
        _, sums0 = jax.eval_shape(loss_of, state["params"], jax.tree.map(lambda x: x[0], micro))
        s0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)
        (grads, loss, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros((), F32), s0), micro)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state["params"])
        metrics = {"loss": loss * scale, "grad_norm": optax.tree.norm(grads), "lr": sched(state["step"]),
                   **objective.metrics(sums)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return _per_batch_layout(objective, mesh, batch_sh, build)


def make_token_logprobs(objective: Objective, combine, mesh, params_sh, frozen_sh, batch_sh=None):
    """jit(fn)(trainable, frozen, batch) -> [B, T] f32 log pi of each target token (0 elsewhere): the sharded,
    gradient-free pass an RL old-policy step records (objective.logprobs, through its memory-saving head)."""
    if objective.logprobs is None:
        raise ValueError(f"objective {objective.name!r} defines no logprobs")
    out_sh = NamedSharding(mesh, mesh_lib.batch_spec(mesh, 2))

    def fn(trainable, frozen, batch):
        return jax.lax.stop_gradient(objective.logprobs(combine(trainable, frozen), batch)).astype(F32)

    def build(batch_sh):
        return jax.jit(fn, in_shardings=(params_sh, frozen_sh, batch_sh), out_shardings=out_sh)

    return _per_batch_layout(objective, mesh, batch_sh, build)


def make_add_noise(mesh):
    """jit(add_noise)(batch, key) with every output split over the batch axes (the step's input layout)."""
    cache = {}

    def fn(batch, key):
        sig = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
        if sig not in cache:
            ranks = dict(sig) | {"row": 1, "noise_key": 2, "noise_u0": 1}
            out = {k: NamedSharding(mesh, mesh_lib.batch_spec(mesh, r)) for k, r in ranks.items()}
            cache[sig] = jax.jit(add_noise, out_shardings=out)
        return cache[sig](batch, key)

    return fn


def step_noise(seed: int, step: int):
    """The SFT loop's key for step `step`: fold_in(PRNGKey(seed), step) (what add_noise turns into batch fields)."""
    return jax.random.fold_in(jax.random.key(seed), step)
