"""The generic sharded train step: micro-batched gradient accumulation, AdamW, one jit with donated state.

state = {"step": int32 [], "params": trainable pytree (full params, or the LoRA adapters), "opt_state": optax state}
frozen = the base params under LoRA (never updated, never donated), else None.

The step knows nothing about the objective: `loss_fn(params, batch, key) -> (loss, sums)` (objectives.py; RL losses
plug in the same way). Loss semantics follow HF Trainer + dLLM: the optimizer sees the mean over micro-batches of
each micro-batch's normalised loss (spec trims_mdlm.md §3.3, "effective normalisation").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dlmjax.train import lora as lora_lib
from dlmjax.train import mesh as mesh_lib
from dlmjax.train.config import LoRAConfig, OptimConfig, StepConfig

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


def make_train_step(loss_fn, sc: StepConfig, oc: OptimConfig, tx, combine, mesh, state_sh, frozen_sh, batch_sh):
    """jit(step)(state, frozen, batch, key) -> (state, metrics); state donated, shardings fixed in and out."""
    accum = sc.grad_accum
    sched = lr_schedule(oc)
    bspec = {k: s.spec for k, s in batch_sh.items()}

    def step(state, frozen, batch, key):
        rng = jax.random.fold_in(key, state["step"])
        b = batch["input_ids"].shape[0]
        batch = {**batch, "row": jnp.arange(b, dtype=jnp.int32)}
        micro = _microbatches(batch, accum)

        def loss_of(trainable, mb):
            return loss_fn(combine(trainable, frozen), mb, rng)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def body(carry, mb):
            g_acc, l_acc, s_acc = carry
            mb = {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, P(*bspec[k])))
                  for k, v in mb.items() if k in bspec} | {"row": mb["row"]}
            (loss, sums), g = grad_fn(state["params"], mb)
            g_acc = jax.tree.map(lambda a, x: a + x.astype(F32), g_acc, g)
            s_acc = jax.tree.map(jnp.add, s_acc, sums) if s_acc is not None else sums
            return (g_acc, l_acc + loss, s_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), state["params"])
        _, sums0 = jax.eval_shape(loss_of, state["params"], jax.tree.map(lambda x: x[0], micro))
        s0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)
        (grads, loss, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros((), F32), s0), micro)
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state["params"])
        metrics = {"loss": loss / accum, "grad_norm": optax.tree.norm(grads), "lr": sched(state["step"]),
                   "masked_acc": sums["n_correct"] / jnp.maximum(sums["n_masked"], 1.0),
                   "masked_frac": sums["n_masked"] / jnp.maximum(sums["n_maskable"], 1.0),
                   "ce_masked": sums["ce_masked"] / jnp.maximum(sums["n_masked"], 1.0)}
        if "n_traj_rows" in sums:
            metrics["traj_frac"] = sums["n_traj_rows"] / jnp.maximum(sums["n_rows"], 1.0)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    rep = mesh_lib.replicated(mesh)
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))
