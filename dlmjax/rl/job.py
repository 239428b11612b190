"""The RL job: SLIM-RL, TraceRL and random masking as one outer loop on the training loop (train/loop.py).

One loop iteration = one outer step (spec §1.1, §2.1):
  prompts (a seeded, checkpointed stream) -> G rollouts each through `decode.api.generate` on the policy's current
  weights (no copy) -> rewards -> group advantages and filter -> training rows (rl/batch.py: SLIM quadrature rows,
  TraceRL slices or random masks) -> the old-policy pass (log pi_old of every row, once) -> one optimizer step per
  minibatch of rows, in order (1 epoch).
Everything random derives from (seed, outer step): rollouts from fold_in(fold_in(key(seed), step), 1), rows from
np.random.default_rng([seed, step]); the prompt stream and the host counters live in the checkpoint, so rerunning
the same command resumes the same run exactly.

Multi-host (jax.distributed, one process per host; docs/rl_multihost_notes.md): every process holds the prompt list
and draws the same stream, so it knows the step's whole rollout batch; it left-pads only its block of rows
(`sharding.process_rows`) to the step's common width and the rollouts run once, on the global mesh and the training
weights. The rollout fields are all-gathered (small int arrays), each process scores only its own contiguous share
of the rollouts and the rewards are all-gathered, so advantages, filters, rows and counters are computed identically
on every process, which feeds its block of each minibatch. Nothing depends on the process count: 2 processes give
one process's metrics and params (tests/test_rl_multiprocess.py), and a run may resume with another process count.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from dlmjax import sharding as mesh_lib
from dlmjax.config import ModelConfig
from dlmjax.decode import api as decode_api
from dlmjax.decode.sdar import BlockDecodeConfig
from dlmjax.rewards.registry import RewardConfig, make_reward
from dlmjax.rl import advantages as adv_lib
from dlmjax.rl import value as value_lib
from dlmjax.rl.batch import build_rows, make_batch, split_minibatches
from dlmjax.rl.config import RLObjectiveConfig, ValueConfig
from dlmjax.rl.layout import pack_rollouts, prompt_width
from dlmjax.rl.objectives import make_rl_objective
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig, TrainJob, run_loop

ROLLOUT_SALT = 1


@dataclasses.dataclass(frozen=True)
class RLRunConfig:
    """Everything one RL run is (the step's global_batch = rows per optimizer step)."""

    loop: LoopConfig
    objective: RLObjectiveConfig
    rollout: BlockDecodeConfig
    reward: RewardConfig
    optim: OptimConfig
    step: StepConfig
    mesh: MeshConfig = MeshConfig()
    lora: LoRAConfig = LoRAConfig()
    prompts_per_step: int = 128  # spec §1.2 num_task_per_step
    group_size: int = 8  # G rollouts per prompt
    max_prompt_len: int = 784  # longer prompts are dropped (the same for every method)
    reset_optimizer: bool = False  # the references restart their trainer each outer step (AdamW + LR reset)
    value: ValueConfig | None = None  # TraceRL's diffusion value model (spec §2.6, rl/value.py); None = off

    def __post_init__(self):
        def bad(why):
            raise ValueError(f"RLRunConfig: {why}")

        if self.prompts_per_step < 1 or self.group_size < 1:
            bad("prompts_per_step and group_size must be >= 1")
        if self.rollout.block_size != self.objective.block_size:
            bad(f"the rollout block size {self.rollout.block_size} must equal the training block size "
                f"{self.objective.block_size} (spec §1.7)")
        if self.optim.total_steps < 1:
            bad("optim.total_steps must be >= 1")
        if self.value is not None and self.objective.objective != "tracerl":
            bad(f"the value model needs objective tracerl (its step-level returns follow TraceRL's slices), not "
                f"{self.objective.objective}")


class PromptStream:
    """The prompt order (a shuffled, repeating grain stream of example indices, `per_step` at a time) plus the host
    counters that must survive a resume (cumulative rows and rollouts). Checkpointed by orbax through grain's
    handler: get_state() / set_state() of JSON bytes."""

    def __init__(self, n: int, per_step: int, seed: int):
        if n < 1:
            raise ValueError("no prompts")
        ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).batch(per_step)
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
        self.counters = {"rows": 0, "rollouts": 0}

    def __next__(self) -> np.ndarray:
        return np.asarray(next(self._it))

    def get_state(self) -> bytes:
        return json.dumps({"stream": self._it.get_state(), "counters": self.counters}).encode()

    def set_state(self, state):
        # bytes: grain's handler (this process's file); a dict: the checkpoint loader's parsed file written by another
        # process count (the state is the same on every process, so any process's file continues the run)
        d = state if isinstance(state, dict) else json.loads(state)
        self._it.set_state(d["stream"])
        self.counters = dict(d["counters"])

    def start_prefetch(self):
        pass


def left_pad(prompts: list[list[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[B, P] left-padded ids and [B] lengths (decode.api's prompt convention); P = width, else the longest prompt."""
    p = max(len(x) for x in prompts) if width is None else width
    out = np.full((len(prompts), p), pad_id, np.int32)
    for i, x in enumerate(prompts):
        out[i, p - len(x):] = x
    return out, np.asarray([len(x) for x in prompts], np.int32)


ROLLOUT_FIELDS = ("tokens", "lengths", "step_map", "n_steps", "tpf", "ewc_per_step")  # what a step reads of a Rollout


def _rollout_stats(ro: dict, n_steps) -> dict:
    """TPF (mean over responses), EWC per denoising step pooled over (rollout, step) pairs (§7), mean length."""
    steps = np.maximum(n_steps.sum(), 1)
    return {"tpf": float(np.mean(np.asarray(ro["tpf"]))),
            "ewc_per_step": float(np.asarray(ro["ewc_per_step"]).sum() / steps),
            "response_len": float(np.mean(np.asarray(ro["lengths"])))}


def share(n: int, process: int, processes: int) -> tuple[int, int]:
    """[lo, hi): the contiguous share of n rollouts that `process` scores (ceil(n / processes) each, the last ones
    shorter or empty)."""
    per = -(-n // processes)
    return min(process * per, n), min((process + 1) * per, n)


def check_batch_split(run: "RLRunConfig", mesh):
    """The step's rollouts (prompts_per_step x group_size) and each minibatch (step.global_batch rows) must split
    over the mesh's data x fsdp row shards (ValueError naming the numbers otherwise)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    b = run.prompts_per_step * run.group_size
    if b % n:
        raise ValueError(f"prompts_per_step x group_size = {run.prompts_per_step} x {run.group_size} = {b} rollouts "
                         f"do not split over the mesh's data x fsdp = {n} row shards")
    if run.step.global_batch % n:
        raise ValueError(f"batch_size = {run.step.global_batch} rows per minibatch do not split over the mesh's "
                         f"data x fsdp = {n} row shards")


def make_rl_job(run: RLRunConfig, model_cfg: ModelConfig, samples: list[dict], detokenize: Callable, pad_id: int,
                log=print, reward_fn: Callable | None = None, eval_fn: Callable | None = None,
                eval_every: int = 0, value_params=None) -> tuple[TrainJob, Callable]:
    """(the TrainJob, close). samples: [{"prompt_ids": [...], "answer"/"task": ...}], already filtered to
    max_prompt_len. detokenize(ids) -> text for the reward. reward_fn: your own batch reward
    (completions, samples, n_tokens) -> (rewards [B], n_failed) instead of run.reward's. close() stops workers.
    eval_fn(outer_step, params) -> {name: float}: called after every `eval_every`-th outer step (1-based) on the
    updated policy's params; its numbers are merged into that step's metrics (plus time_eval).
    value_params: the value model's starting backbone (run.value set; rl/value.py), e.g. the policy's init params."""
    rc, dc = run.objective, run.rollout
    if model_cfg.mask_token_id is None:
        raise ValueError("RL needs a diffusion checkpoint with a mask_token_id")
    stream = PromptStream(len(samples), run.prompts_per_step, run.step.seed)
    score, close = (reward_fn, lambda: None) if reward_fn else make_reward(run.reward, dc.max_new_tokens)
    mesh = mesh_lib.make_mesh(run.mesh)
    vjob = None if run.value is None else value_lib.make_value_job(run.value, model_cfg, rc, run.step, run.optim,
                                                                    value_params, mesh)
    objective = make_rl_objective(model_cfg, rc, mesh, token_adv=vjob is not None)
    minibatch = run.step.global_batch
    check_batch_split(run, mesh)
    cache = {}

    def logprob_fn(ctx):
        if "lp" not in cache:
            cache["lp"] = step_lib.make_token_logprobs(objective, ctx.combine, ctx.mesh, ctx.state_sh["params"],
                                                       ctx.frozen_sh)
        return cache["lp"]

    def reset(ctx, state):
        if "reset" not in cache:
            cache["reset"] = jax.jit(lambda s: {"step": jnp.zeros_like(s["step"]), "params": s["params"],
                                                "opt_state": ctx.tx.init(s["params"])},
                                     in_shardings=(ctx.state_sh,), out_shardings=ctx.state_sh, donate_argnums=(0,))
        return cache["reset"](state)

    def rollouts(ctx, params, prompt_ids, key):
        """Every row's rollout fields as host arrays, on every process (multi-process: each feeds its block)."""
        width = prompt_width(max(len(x) for x in prompt_ids), rc.block_size)  # one bucketed width per step
        if jax.process_count() == 1:
            prompts, lens = left_pad(prompt_ids, pad_id, width)
            ro = decode_api.generate(dc, model_cfg, params, jnp.asarray(prompts), jnp.asarray(lens), key,
                                     mesh=ctx.mesh)
            return jax.device_get({k: getattr(ro, k) for k in ROLLOUT_FIELDS})
        from jax.experimental import multihost_utils

        n, rows = len(prompt_ids), mesh_lib.process_rows(ctx.mesh, len(prompt_ids))
        prompts, lens = left_pad(prompt_ids[rows], pad_id, width)  # one global width
        g = mesh_lib.global_batch(ctx.mesh, {"prompts": prompts, "lens": lens}, rows=n)
        ro = decode_api.generate(dc, model_cfg, params, g["prompts"], g["lens"], key, mesh=ctx.mesh)
        return multihost_utils.process_allgather({k: getattr(ro, k) for k in ROLLOUT_FIELDS}, tiled=True)

    def rewards_of(responses, group, lengths):
        """(rewards [B], failures) of every rollout; multi-process: each process scores its own share, then the
        rewards are all-gathered (the same on every process)."""
        texts = lambda rs: [detokenize(r) for r in rs]  # noqa: E731
        if jax.process_count() == 1:
            return score(texts(responses), group, [int(n) for n in lengths])
        from jax.experimental import multihost_utils

        n = len(group)
        lo, hi = share(n, jax.process_index(), jax.process_count())
        per = -(-n // jax.process_count())
        mine = np.zeros(per + 1, np.float32)  # this share's rewards, zero-padded, then its failure count
        if hi > lo:
            r, f = score(texts(responses[lo:hi]), group[lo:hi], [int(x) for x in lengths[lo:hi]])
            mine[:hi - lo], mine[per] = r, f
        got = np.asarray(multihost_utils.process_allgather(mine, tiled=False))  # [processes, per + 1]
        return got[:, :per].reshape(-1)[:n].astype(np.float32), int(got[:, per].sum())

    def place(ctx, mb):
        """A minibatch every process holds in full -> global arrays, each process feeding its block of rows."""
        n = len(next(iter(mb.values())))
        rows = mesh_lib.process_rows(ctx.mesh, n)
        return mesh_lib.global_batch(ctx.mesh, {k: v[rows] for k, v in mb.items()}, rows=n)

    def advance(ctx, state, frozen, step):
        t0 = time.perf_counter()
        state = dict(state)
        aux = state.pop("aux", None)  # the value model's state (TrainJob.aux_init), else None
        idx = next(stream)
        group = [samples[int(i)] for i in idx for _ in range(run.group_size)]  # G adjacent copies per prompt
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.step.seed), step), ROLLOUT_SALT)
        params = ctx.combine(state["params"], frozen)
        ro = rollouts(ctx, params, [s["prompt_ids"] for s in group], key)
        tokens, lengths = np.asarray(ro["tokens"]), np.asarray(ro["lengths"])
        step_map, n_steps = np.asarray(ro["step_map"]), np.asarray(ro["n_steps"])
        t1 = time.perf_counter()
        responses = [tokens[i, :lengths[i]] for i in range(len(group))]
        rewards, failed = rewards_of(responses, group, lengths)
        t2 = time.perf_counter()
        r = rewards.reshape(len(idx), run.group_size)
        adv = adv_lib.group_advantages(r, rc.advantage_method)
        keep = adv_lib.group_filter(r, adv, rc.group_filter, rc.filter_low, rc.filter_high)
        kept = np.repeat(keep, run.group_size)
        metrics = {"reward": float(rewards.mean()), "accuracy": float((rewards > 0).mean()),
                   "reward_failures": float(failed), "groups_kept": float(keep.sum()),
                   **_rollout_stats(ro, n_steps)}
        rows_now = 0
        t3 = t4 = t2
        if kept.any():
            sel = np.flatnonzero(kept)
            packed = pack_rollouts([group[i]["prompt_ids"] for i in sel], [responses[i] for i in sel], pad_id,
                                   step_maps=[step_map[i, :lengths[i]] for i in sel],
                                   max_gen_length=dc.max_new_tokens,
                                   l0=prompt_width(max(len(group[i]["prompt_ids"]) for i in sel), rc.block_size))
            rows = build_rows(rc, packed, model_cfg.mask_token_id, np.random.default_rng([run.step.seed, step]))
            rows_now = len(rows)
        if rows_now:
            batch = make_batch(packed, rows, adv.reshape(-1)[sel], minibatch)
            minis = split_minibatches(batch, minibatch)
            if vjob is not None:  # value model (§2.6): V_old -> per-token advantages (adv_tok), value update(s)
                aux, minis, vm = vjob.phase(ctx, aux, minis, step, run.reset_optimizer, place)
                metrics.update(vm)
            lp_fn = logprob_fn(ctx)
            placed = []
            for mb in minis:  # the old-policy pass: log pi_old of every row, before any update
                g = place(ctx, mb)
                placed.append({**g, "logp_old": lp_fn(state["params"], frozen, g)})
            jax.block_until_ready(placed[-1]["logp_old"])
            t3 = time.perf_counter()
            if run.reset_optimizer:
                state = reset(ctx, state)
            sums = []
            for mb in placed:
                state, m = ctx.step_fn(state, frozen, mb)
                sums.append(m)
            got = jax.device_get(sums)
            t4 = time.perf_counter()
            n = len(got)
            for k in ("loss", "grad_norm", "lr", "kl", "ratio", "clip_frac", "mask_ratio"):
                metrics[k] = float(np.mean([g[k] for g in got]))
            metrics["updates"] = float(n)
        else:
            metrics.update(loss=0.0, grad_norm=0.0, lr=0.0, updates=0.0)
            if vjob is not None:
                metrics.update({k: 0.0 for k in value_lib.VALUE_METRICS})
        stream.counters["rows"] += rows_now
        stream.counters["rollouts"] += len(group)
        metrics.update(rows=float(rows_now), rows_total=float(stream.counters["rows"]),
                       rollouts_total=float(stream.counters["rollouts"]), time_rollout=t1 - t0,
                       time_reward=t2 - t1, time_old_policy=t3 - t2 - metrics.get("time_value", 0.0),
                       time_update=t4 - t3)
        if eval_fn is not None and eval_every > 0 and (step + 1) % eval_every == 0:
            t5 = time.perf_counter()
            metrics.update({k: float(v) for k, v in eval_fn(step + 1, ctx.combine(state["params"], frozen)).items()})
            metrics["time_eval"] = time.perf_counter() - t5
        if aux is not None:
            state["aux"] = aux
        return state, metrics

    meta = {"model": dataclasses.asdict(model_cfg), "objective": dataclasses.asdict(rc),
            "rollout": dataclasses.asdict(dc), "lora": dataclasses.asdict(run.lora), "seed": run.step.seed,
            "prompts": len(samples), "prompts_per_step": run.prompts_per_step, "group_size": run.group_size,
            "value": None if run.value is None else dataclasses.asdict(run.value)}
    job = TrainJob(name=f"rl:{rc.objective}", objective=objective, advance=advance, data_iter=stream, meta=meta,
                   resume_keys=tuple(meta), headline=("reward", "loss"),
                   aux_init=None if vjob is None else vjob.init)
    return job, close


def run_rl(run: RLRunConfig, model_cfg: ModelConfig, params, samples: list[dict], detokenize: Callable, pad_id: int,
           export=None, log=print, reward_fn: Callable | None = None, eval_fn: Callable | None = None,
           eval_every: int = 0, value_params=None) -> dict:
    """Train with RL; returns the loop's summary (per outer step metrics in `history`; eval_fn: see make_rl_job).
    value_params: the value model's starting backbone when run.value is set (default: `params`, the policy's init,
    as dLLM-RL's model.value_base_model usually is); the summary's state then holds it under "aux"."""
    if run.value is not None and value_params is None:
        value_params = params
    job, close = make_rl_job(run, model_cfg, samples, detokenize, pad_id, log, reward_fn, eval_fn, eval_every,
                             value_params)
    try:
        return run_loop(run.loop, model_cfg, params, job, run.optim, run.step, run.mesh, run.lora, export=export,
                        log=log)
    finally:
        close()
