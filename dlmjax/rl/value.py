"""TraceRL's optional diffusion value model (spec §2.6; dLLM-RL train/init_sdar_value_model.py,
train/train_sdar_value.py, train/train_sdar_policy.py, configs/rl_sdar_with_value.yaml).

The value net is a copy of the SDAR backbone (embed, layers, final norm; the LM head is never read, so it is not
kept) plus a linear head hidden -> 1 without bias, zero-initialised (`init_sdar_value_model.py`). It runs on the
policy's TraceRL rows: V_t = the head on the final-normed hidden state at the noisy position of token t, in the row
where t is a target (every non-pad token is a target of exactly one row).

Per outer step (the reference's order: rl.py runs train_sdar_value.py, then train_sdar_policy.py):
  1. the old pass: V_old of every row's targets with the value params before this step's update;
  2. returns and advantages from V_old (host side, float64): per rollout, its target tokens grouped by their (shrunk)
     step id in increasing order t = 1..S; r_t* = mean token reward of step t (the sequence reward, i.e. the rollout's
     group advantage, sits on the tokens of the last step only), V_t* = mean of their V_old;
     R_t* = r_t* + gamma R_{t+1}*, delta_t* = r_t* - V_t* + gamma V_{t+1}*, A_t* = delta_t* + gamma lam A_{t+1}*
     (0 beyond S); token j of step t: R_j = r_j + gamma R_{t+1}*, A_j = (r_j - V_j) + gamma V_{t+1}* + gamma lam
     A_{t+1}*. gamma = lam = 1: R_j = the sequence reward, A_j = R_j - V_old_j;
  3. the value updates (every `train_every`-th outer step): one AdamW step per minibatch of the same rows, loss per
     row (1 / L1) sum_targets 1/2 max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2), rows weighted by row_scale
     (the mean over the minibatch's real rows, as the policy loss);
  4. the policy update with A_j per token (advantages from V_old, i.e. before the value update; not re-normalised).

Everything here is a pure function of its inputs; `make_value_job` ties them to the training loop (TrainJob.aux_init:
the value params and optimizer state ride in the checkpointed state as state["aux"]).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax import sharding as mesh_lib
from dlmjax.config import ModelConfig
from dlmjax.model.transformer import hidden_states
from dlmjax.rl.config import RLObjectiveConfig, ValueConfig
from dlmjax.rl.layout import extended_attention_mask
from dlmjax.train import step as step_lib
from dlmjax.train.config import OptimConfig, StepConfig
from dlmjax.train.objective import Objective

F32 = jnp.float32
BACKBONE_KEYS = ("embed", "layers", "final_norm")
FORWARD_KEYS = ("input_ids", "positions", "prompt_valid", "targets")  # what token_values reads
VALUE_BATCH_KEYS = FORWARD_KEYS + ("row_scale", "v_old", "ret")
# what ValueJob.phase adds to an outer step's metrics
VALUE_METRICS = ("value_loss", "value_grad_norm", "value_clip_frac", "value_mean", "value_explained_var",
                 "value_updates", "time_value")


# --- the value net ---------------------------------------------------------------------------------------------------

def value_params(cfg: ModelConfig, backbone: dict) -> dict:
    """{embed, layers, final_norm} of `backbone` (a params pytree of `cfg`; arrays are not copied) + value_head [D]
    zeros in the backbone's param dtype."""
    missing = [k for k in BACKBONE_KEYS if k not in backbone]
    if missing:
        raise ValueError(f"value_params: the backbone params lack {missing}")
    dt = backbone["final_norm"].dtype
    return {**{k: backbone[k] for k in BACKBONE_KEYS}, "value_head": np.zeros((cfg.hidden_size,), dt)}


def token_values(cfg: ModelConfig, vparams: dict, batch: dict, k: int, align: str = "response", constrain=None):
    """[R, L1] f32 V at the noisy position of each response token, on the targets (0 elsewhere).

    batch: input_ids [R, N], positions [R, N], prompt_valid [R, L0], targets [R, L1] (rl/batch.py's rows).
    constrain: optional fn on the noisy hidden states [R, L1, D] (a sharding constraint)."""
    ids, pv, targets = batch["input_ids"], batch["prompt_valid"], batch["targets"]
    l0, l1 = pv.shape[1], targets.shape[1]
    if ids.shape[1] != l0 + 2 * l1:
        raise ValueError(f"token_values: input_ids has {ids.shape[1]} columns, expected L0 + 2 L1 = {l0} + 2 * {l1}")
    mask = extended_attention_mask(l0, l1, k, pv, align)  # [R, N, N]
    h, _ = hidden_states(cfg, vparams, ids, batch["positions"], mask)  # [R, N, D]
    hn = h[:, l0 + l1:]  # [R, L1, D] noisy positions
    if constrain is not None:
        hn = constrain(hn)
    v = jnp.einsum("rld,d->rl", hn, vparams["value_head"].astype(hn.dtype), preferred_element_type=F32)
    return jnp.where(targets, v, 0.0)


def value_loss(v, v_old, ret, targets, row_scale, clip: float = 0.2):
    """(loss f32 [], sums): the clipped value loss sum_rows row_scale (1 / L1) sum_targets
    1/2 max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2) (train_sdar_value.py `forward_process`).

    v, v_old, ret: [R, L1] f32 (read on targets only); targets [R, L1] bool; row_scale [R] (0 on dummy rows).
    sums: value_loss, v_sum (V over real targets), clip_count (targets whose clipped term is the larger),
    n_targets, n_rows."""
    v, v_old, ret = v.astype(F32), v_old.astype(F32), ret.astype(F32)
    vc = v_old + jnp.clip(v - v_old, -clip, clip)
    lu = jnp.square(v - ret)
    lc = jnp.square(vc - ret)
    per = jnp.where(targets, 0.5 * jnp.maximum(lu, lc), 0.0)  # [R, L1]
    loss = jnp.sum(row_scale.astype(F32) * jnp.sum(per, axis=-1) / v.shape[-1])
    real = (row_scale > 0).astype(F32)
    on = targets.astype(F32) * real[:, None]
    sums = {"value_loss": loss, "v_sum": jnp.sum(on * v), "clip_count": jnp.sum(on * (lc > lu)),
            "n_targets": jnp.sum(on), "n_rows": jnp.sum(real)}
    return loss, sums


def value_metrics(sums: dict) -> dict:
    """Logged numbers of a value update: its loss, mean V over the targets, fraction of clipped targets."""
    n = jnp.maximum(sums["n_targets"], 1.0)
    return {"value_loss": sums["value_loss"], "value_mean": sums["v_sum"] / n,
            "value_clip_frac": sums["clip_count"] / n}


def make_value_objective(cfg: ModelConfig, rc: RLObjectiveConfig, vc: ValueConfig, mesh=None) -> Objective:
    """The value model as an `Objective` (reduce="sum": row_scale already divides by the minibatch's real rows), so
    it runs through the same sharded train step; `logprobs` is the gradient-free per-token pass (here: V_old)."""
    constrain = None
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        spec = NamedSharding(mesh, P(("data", "fsdp"), None, None))
        constrain = lambda h: jax.lax.with_sharding_constraint(h, spec)  # noqa: E731

    def values(params, batch):
        return token_values(cfg, params, batch, rc.block_size, rc.block_align, constrain)

    def loss_fn(params, batch):
        return value_loss(values(params, batch), batch["v_old"], batch["ret"], batch["targets"], batch["row_scale"],
                          vc.clip)

    return Objective(name="value", loss_fn=loss_fn, batch_keys=VALUE_BATCH_KEYS, metrics=value_metrics,
                     reduce="sum", logprobs=values)


# --- returns and advantages (host side) ------------------------------------------------------------------------------

def returns_advantages(rollout, targets, step_id, seq_reward, values, gamma: float = 1.0, lam: float = 1.0):
    """(ret [R, L1] f32, adv [R, L1] f32), 0 off-target: TraceRL's step-level returns / GAE mapped back to tokens
    (module docstring, step 2; train_sdar_value.py `compute_returns_and_advantages_from_fragments`), float64 inside.

    rollout [R] int source rollout (< 0: dummy row); targets [R, L1] bool; step_id [R, L1] int the (shrunk) step id of
    each target; seq_reward [R] the row's sequence reward (its rollout's group advantage; equal on all its rows);
    values [R, L1] V_old on the targets. A rollout's tokens are the targets of all its rows (each exactly once)."""
    rollout = np.asarray(rollout).reshape(-1)
    targets = np.asarray(targets, bool)
    ret = np.zeros(targets.shape, np.float64)
    adv = np.zeros(targets.shape, np.float64)
    ri, ti = np.nonzero(targets & (rollout >= 0)[:, None])
    if ri.size == 0:
        return ret.astype(np.float32), adv.astype(np.float32)
    sid = np.asarray(step_id, np.int64)[ri, ti]
    v = np.asarray(values, np.float64)[ri, ti]
    _, ro = np.unique(rollout[ri], return_inverse=True)  # dense rollout index of each token
    ro = ro.reshape(-1)
    nr = int(ro.max()) + 1
    last = np.full(nr, np.iinfo(np.int64).min)
    np.maximum.at(last, ro, sid)  # the rollout's last step
    r_tok = np.where(sid == last[ro], np.asarray(seq_reward, np.float64)[ri], 0.0)
    lo = int(sid.min())
    span = int(sid.max()) - lo + 1
    keys, grp = np.unique(ro * span + (sid - lo), return_inverse=True)  # (rollout, step) groups, sorted
    grp = grp.reshape(-1)
    cnt = np.bincount(grp).astype(np.float64)
    r_star = np.bincount(grp, r_tok) / cnt
    v_star = np.bincount(grp, v) / cnt
    g_ro = keys // span
    col = np.arange(len(keys)) - np.searchsorted(g_ro, g_ro)  # the step's rank inside its rollout
    s = int(col.max()) + 1
    rs = np.zeros((nr, s + 1))
    vs = np.zeros((nr, s + 1))  # column s (and beyond a rollout's own S) stays 0: "0 beyond S"
    rs[g_ro, col] = r_star
    vs[g_ro, col] = v_star
    big_r = np.zeros((nr, s + 1))
    big_a = np.zeros((nr, s + 1))
    for c in range(s - 1, -1, -1):  # host NumPy, vectorised over rollouts
        big_r[:, c] = rs[:, c] + gamma * big_r[:, c + 1]
        big_a[:, c] = rs[:, c] - vs[:, c] + gamma * vs[:, c + 1] + gamma * lam * big_a[:, c + 1]
    nxt = col[grp] + 1
    ret[ri, ti] = r_tok + gamma * big_r[ro, nxt]
    adv[ri, ti] = (r_tok - v) + gamma * vs[ro, nxt] + gamma * lam * big_a[ro, nxt]
    return ret.astype(np.float32), adv.astype(np.float32)


def explained_variance(ret, values, mask) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens (0 when Var(R) is 0 or nothing is masked)."""
    r = np.asarray(ret, np.float64)[mask]
    v = np.asarray(values, np.float64)[mask]
    var = r.var() if r.size else 0.0
    return float(1.0 - (r - v).var() / var) if var > 0 else 0.0


# --- the value model in the RL job -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ValueJob:
    """init(mesh) -> (value state, its shardings): TrainJob.aux_init. phase(ctx, aux, minis, step, reset, place) ->
    (aux, minis with adv_tok, metrics): steps 1-3 of the module docstring for one outer step, before the policy's
    old pass and update (the reference runs train_sdar_value.py, then train_sdar_policy.py)."""

    init: Callable
    phase: Callable
    objective: Objective


def _all_rows(x) -> np.ndarray:
    """Every row of a batch-sharded global array, on every process (the RL job holds each minibatch in full on
    every process and computes the host-side quantities identically everywhere)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_value_job(vc: ValueConfig, cfg: ModelConfig, rc: RLObjectiveConfig, sc: StepConfig, oc: OptimConfig,
                   backbone: dict, mesh=None) -> ValueJob:
    """The value model of an RL run: backbone = the params it starts from (the policy's init by default; dropped
    after init). Its optimizer is the policy's AdamW (betas, eps, weight decay, clip, schedule) at lr = vc.lr; its
    minibatches are the policy's (same rows, same order, same grad accumulation). `mesh`: for the hidden-state
    sharding constraint (as make_rl_objective)."""
    if rc.objective != "tracerl":
        raise ValueError(f"the value model needs TraceRL rows (objective tracerl), not {rc.objective!r}")
    obj = make_value_objective(cfg, rc, vc, mesh)
    voc = dataclasses.replace(oc, lr=vc.lr)
    vtx = step_lib.make_optimizer(voc)
    held = {"backbone": backbone}
    fns = {}

    def init(mesh):
        if "backbone" not in held:
            raise RuntimeError("ValueJob.init builds the value state once per job (its backbone is then dropped)")
        vp = value_params(cfg, held.pop("backbone"))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vp)
        sh = mesh_lib.shardings(mesh, step_lib.state_specs(mesh, vtx, abstract))
        # a private copy: the policy state may hold the very same buffers (and donates them at every step)
        trainable = jax.device_put(vp, sh["params"], may_alias=False)
        return step_lib.init_state(mesh, vtx, trainable)

    def build(ctx):
        ident = lambda t, f: t  # noqa: E731
        fwd = dataclasses.replace(obj, name="value_old", batch_keys=FORWARD_KEYS)  # the old pass reads no v_old / ret
        fns["old"] = step_lib.make_token_logprobs(fwd, ident, ctx.mesh, ctx.aux_sh["params"], None)
        fns["step"] = step_lib.make_train_step(obj, sc, voc, vtx, ident, ctx.mesh, ctx.aux_sh, None, None)
        fns["reset"] = jax.jit(lambda s: {"step": jnp.zeros_like(s["step"]), "params": s["params"],
                                          "opt_state": vtx.init(s["params"])},
                               in_shardings=(ctx.aux_sh,), out_shardings=ctx.aux_sh, donate_argnums=(0,))

    def phase(ctx, aux, minis, step, reset=False, place=None):
        """minis: the step's host minibatches (each held in full, rl/batch.py, TraceRL's step_id in them); place(ctx,
        mb) -> global arrays of a host minibatch (the job's; default: global_batch). Returns (aux, minis with the
        per-token advantage "adv_tok" [rows, L1] f32 added, metrics)."""
        t0 = time.perf_counter()
        if not fns:
            build(ctx)
        place = place or (lambda c, mb: mesh_lib.global_batch(c.mesh, mb))
        placed = [place(ctx, {k: m[k] for k in FORWARD_KEYS + ("row_scale",)}) for m in minis]
        v_dev = [fns["old"](aux["params"], None, g) for g in placed]  # V_old, before this step's value update
        v_old = np.concatenate([_all_rows(v) for v in v_dev])
        host = {k: np.concatenate([m[k] for m in minis]) for k in ("rollout", "targets", "step_id", "adv")}
        ret, adv_tok = returns_advantages(host["rollout"], host["targets"], host["step_id"], host["adv"], v_old,
                                          vc.gamma, vc.lam)
        real = host["targets"] & (host["rollout"] >= 0)[:, None]
        metrics = {"value_mean": float(v_old[real].mean()) if real.any() else 0.0,
                   "value_explained_var": explained_variance(ret, v_old, real)}
        out, at, got = [], 0, []
        train = (step + 1) % vc.train_every == 0  # experiment.current_epoch (1-based) % train_value_every
        if train and reset:
            aux = fns["reset"](aux)
        for m, g, v in zip(minis, placed, v_dev):
            n = m["targets"].shape[0]
            out.append({**m, "adv_tok": adv_tok[at:at + n]})
            if train:
                aux, mt = fns["step"](aux, None, {**g, "v_old": v, **place(ctx, {"ret": ret[at:at + n]})})
                got.append(mt)
            at += n
        got = jax.device_get(got)
        for k, name in (("loss", "value_loss"), ("grad_norm", "value_grad_norm"),
                        ("value_clip_frac", "value_clip_frac")):
            metrics[name] = float(np.mean([g[k] for g in got])) if got else 0.0
        metrics["value_updates"] = float(len(got))
        metrics["time_value"] = time.perf_counter() - t0
        return aux, out, metrics

    return ValueJob(init=init, phase=phase, objective=obj)
