"""The one training loop every training job runs on (SFT today, RL next): init or resume, LoRA split/merge, the
sharded step, orbax saves with exact resume (state + the job's iterator), SIGTERM save, progress bar, TensorBoard and
log lines from the objective's metrics, final export.

A job plugs in a `TrainJob`: its objective, its checkpointable iterator, the fields that must match on resume, and
`advance(ctx, state, frozen, step) -> (state, metrics)` — one loop iteration (SFT: one batch, one optimizer step).
Same seed + same flags = same run; a resumed run continues bit-for-bit (state, iterator position, and noise, which
comes from fold_in(PRNGKey(seed), step) placed in the batch by the job). A job with a second trainable model (RL's
value model) adds it through `TrainJob.aux_init`: it rides in the checkpointed state as state["aux"].
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import signal
import time
from typing import Callable

import jax
import numpy as np

from dlmjax.checkpoint import train_state as ckpt_lib
from dlmjax.checkpoint.convert import save_checkpoint
from dlmjax.config import ModelConfig
from dlmjax import sharding as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, OptimConfig, StepConfig
from dlmjax.train.objective import Objective


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Where and how often the loop saves, logs and stops."""

    workdir: str
    steps: int
    log_every: int = 10
    save_every: int = 100
    keep: int = 2
    resume: bool = True
    export: bool = True  # write <workdir>/final as a dlmjax checkpoint (LoRA merged)
    tensorboard: bool = True
    async_save: bool = True
    stop_at: int = 0  # > 0: save and leave after this step, as a preemption would (resume tests, time-boxed jobs)

    def __post_init__(self):
        if not self.workdir:
            raise ValueError("workdir is required")
        if self.steps <= 0 or self.log_every <= 0 or self.save_every <= 0 or self.keep <= 0:
            raise ValueError("steps, log_every, save_every and keep must be positive")


@dataclasses.dataclass(frozen=True)
class LoopContext:
    """What `advance` may use: the mesh, the jitted step and the shardings the loop built."""

    mesh: object
    step_fn: Callable  # (state, frozen, batch) -> (state, metrics)
    combine: Callable  # (trainable, frozen) -> model params
    state_sh: dict
    frozen_sh: object
    seed: int
    tx: object  # the optax optimizer (a job may re-initialise its state, as RL's per-outer-step reset does)
    aux_sh: object = None  # NamedShardings of state["aux"] (TrainJob.aux_init), else None


@dataclasses.dataclass
class TrainJob:
    """A training job as the loop sees it."""

    name: str
    objective: Objective
    advance: Callable  # (ctx, state, frozen, step) -> (state, metrics {name: device scalar})
    data_iter: object = None  # checkpointed with the state (a grain iterator), or None
    meta: dict = dataclasses.field(default_factory=dict)  # recorded in every checkpoint
    resume_keys: tuple = ()  # meta fields that must match the checkpoint's to resume
    tokens_per_step: int = 0  # for the tokens/s figure (0: not shown)
    headline: tuple = ("loss",)  # metrics on the progress bar
    # (mesh) -> (aux pytree, its NamedShardings): a second trainable state (e.g. TraceRL's value model: its params and
    # optimizer state). The loop keeps it as state["aux"] -- checkpointed and resumed with the run, handed to advance,
    # which returns it updated; the policy's step_fn must be given the state without it. None: state has no "aux".
    aux_init: Callable | None = None


def _install_sigterm():
    """SIGTERM (preemption) -> save at the next step boundary and leave. Returns a `preempted(step)` predicate and a
    restore fn. Multi-process: JAX's preemption sync service (started by jax.distributed.initialize; its SIGTERM
    notifier must not be replaced by a Python handler) tells every process to stop at the *same* step, even when
    only some of them got the signal; a per-process flag would let them diverge and hang in the next collective."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point, lambda: None
    flag = []
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: flag.append(True))
    except ValueError:  # not the main thread
        return lambda _: False, lambda: None
    return lambda _: bool(flag), lambda: signal.signal(signal.SIGTERM, old)


class _BelowWarningFromOrbax(logging.Filter):
    """Drops orbax's INFO / DEBUG records (~110 lines per SFT run: every save's threads, barriers, renames) and the
    tracebacks of its warnings / errors (one line each; the job's own error line names the cause)."""

    def filter(self, record):
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.msg = str(record.msg).splitlines()[0][:300] if str(record.msg) else record.msg
        return True


_ORBAX_FILTER = _BelowWarningFromOrbax()


def _quiet_orbax():
    """Silence orbax's INFO lines (absl's app.run raises the default verbosity to INFO) unless --verbosity was given
    on the command line / flagfile. Warnings and errors always pass."""
    from absl import flags

    try:
        asked = flags.FLAGS["verbosity"].present
    except KeyError:
        asked = False
    absl_logger = logging.getLogger("absl")
    if asked:
        absl_logger.removeFilter(_ORBAX_FILTER)
    elif _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)


def _remove_stale_exports(workdir: str):
    """What an export killed half-way leaves: `<workdir>/.final.tmp-*` (atomic_dir's temporary directory, never
    renamed) and `.final.old-*` (the replaced export, killed before its removal). Nothing else writes them."""
    if jax.process_index() != 0:
        return
    for d in glob.glob(os.path.join(glob.escape(workdir), ".final.tmp-*")) + \
            glob.glob(os.path.join(glob.escape(workdir), ".final.old-*")):
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _cleanup_on_failure(workdir: str):
    """A run that fails before it saved any checkpoint leaves nothing behind: the workdir if this run created it,
    else the subdirectories (checkpoints/, tb/) it created. A run with a finished checkpoint keeps everything (the
    next run resumes from it)."""
    made = [] if os.path.exists(workdir) else [workdir]
    sub = [os.path.join(workdir, d) for d in ("checkpoints", "tb") if not os.path.exists(os.path.join(workdir, d))]
    try:
        yield
    except BaseException:
        ck = os.path.join(workdir, "checkpoints")
        saved = os.path.isdir(ck) and any(x.isdigit() for x in os.listdir(ck))
        if not saved and jax.process_index() == 0:
            for d in (made or sub):
                shutil.rmtree(d, ignore_errors=True)
        raise


def _writer(loop: LoopConfig):
    if not loop.tensorboard or jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(loop.workdir, "tb"))


def _log_line(step: int, total: int, row: dict) -> str:
    """`step s/N loss x <objective metrics> grad_norm g lr l [tokens/s t] step m ms` (the loss comes first: tools
    and tests parse `^step (\\d+)/\\d+ loss (\\S+)`)."""
    fixed = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s")
    parts = [f"step {step}/{total} loss {row['loss']:.4f}"]
    parts += [f"{k} {v:.3f}" for k, v in row.items() if k not in fixed]
    parts.append(f"grad_norm {row['grad_norm']:.3f} lr {row['lr']:.2e}")
    if "tokens_per_s" in row:
        parts.append(f"tokens/s {row['tokens_per_s']:.0f}")
    parts.append(f"step {row['step_time_s'] * 1e3:.0f} ms")
    return " ".join(parts)


def run_loop(loop: LoopConfig, model_cfg: ModelConfig, params, job: TrainJob, opt: OptimConfig, sc: StepConfig,
             mc: MeshConfig, lc: LoRAConfig, export: Callable | None = None, log=print) -> dict:
    """Train `job`; returns a summary (metrics per logged step, status, where the checkpoints are, final state).
    export(params, dst): writes the final model (LoRA merged); called on process 0 paths via export_final.
    A run that fails before its first checkpoint removes what it created (the workdir, or checkpoints/ and tb/)."""
    _quiet_orbax()
    with _cleanup_on_failure(loop.workdir):
        return _run_loop(loop, model_cfg, params, job, opt, sc, mc, lc, export, log)


def _run_loop(loop, model_cfg, params, job, opt, sc, mc, lc, export, log) -> dict:
    os.makedirs(loop.workdir, exist_ok=True)
    _remove_stale_exports(loop.workdir)
    mesh = mesh_lib.make_mesh(mc)
    tx = step_lib.make_optimizer(opt)
    split, combine = step_lib.trainable_view(lc, params)
    trainable, frozen = split(params, jax.random.key(sc.seed + 1))
    state, state_sh = step_lib.init_state(mesh, tx, trainable)
    frozen_sh = None
    if frozen is not None:
        frozen_sh = mesh_lib.shardings(mesh, mesh_lib.param_specs(mesh, frozen))
        frozen = jax.device_put(frozen, frozen_sh)
    del params, trainable
    aux_sh, full_sh = None, state_sh
    if job.aux_init is not None:
        aux, aux_sh = job.aux_init(mesh)
        state, full_sh = {**state, "aux": aux}, {**state_sh, "aux": aux_sh}
        del aux

    meta = json.loads(json.dumps(job.meta))  # tuples -> lists, as they come back from JSON
    mngr = ckpt_lib.manager(os.path.join(loop.workdir, "checkpoints"), loop.save_every, loop.keep, loop.async_save)
    try:
        start = 0
        latest = mngr.latest_step() if loop.resume else None
        if latest is not None:
            ckpt_lib.check_compatible(ckpt_lib.read_meta_checked(mngr, latest), meta, job.resume_keys,
                                      os.path.join(loop.workdir, "checkpoints", str(latest)))
            state, _ = ckpt_lib.restore_checked(mngr, latest, ckpt_lib.abstract_like(state, full_sh),
                                                job.data_iter)
            start = int(latest)
            log(f"resumed from step {start} ({os.path.join(loop.workdir, 'checkpoints')})")

        step_fn = step_lib.make_train_step(job.objective, sc, opt, tx, combine, mesh, state_sh, frozen_sh, None)
        ctx = LoopContext(mesh=mesh, step_fn=step_fn, combine=combine, state_sh=state_sh, frozen_sh=frozen_sh,
                          seed=sc.seed, tx=tx, aux_sh=aux_sh)
        writer = _writer(loop)
        preempted, restore_signal = _install_sigterm()
        history, pending = [], []
        show = jax.process_index() == 0
        from tqdm import tqdm

        bar = tqdm(total=loop.steps, initial=start, desc=job.name, disable=not show, dynamic_ncols=True,
                   mininterval=1.0)
        t_log, step, stopped = time.perf_counter(), start, "done"
        try:
            while step < loop.steps:
                state, metrics = job.advance(ctx, state, frozen, step)
                step += 1
                pending.append((step, metrics))
                bar.update(1)
                if step % loop.log_every == 0 or step == loop.steps:
                    got = jax.device_get([m for _, m in pending])
                    dt = time.perf_counter() - t_log
                    for (s, _), m in zip(pending, got):
                        row = {"step": s, **{k: float(v) for k, v in m.items()}}
                        history.append(row)
                        if writer is not None:
                            for k, v in row.items():
                                if k != "step":
                                    writer.add_scalar(f"train/{k}", v, s)
                    row = history[-1]
                    if job.tokens_per_step:
                        row["tokens_per_s"] = job.tokens_per_step * len(pending) / dt
                    row["step_time_s"] = dt / len(pending)
                    if writer is not None:
                        for k in ("tokens_per_s", "step_time_s"):
                            if k in row:
                                writer.add_scalar(f"train/{k}", row[k], step)
                    bar.set_postfix({k: f"{row[k]:.4f}" for k in job.headline if k in row})
                    log(_log_line(step, loop.steps, row))
                    pending, t_log = [], time.perf_counter()
                pre = preempted(step)  # multi-process: a collective decision; call it once at every step
                if pre or (loop.stop_at and step >= loop.stop_at and step < loop.steps):
                    stopped = "preempted" if pre else "stopped"
                    break
                ckpt_lib.save(mngr, step, state, job.data_iter, meta)
            mngr.wait_until_finished()
            if step not in mngr.all_steps():
                ckpt_lib.save(mngr, step, state, job.data_iter, meta, force=True)
            mngr.wait_until_finished()
            if stopped != "done":
                log(f"{stopped} at step {step}/{loop.steps}; checkpoint saved, rerun to resume")
        finally:
            bar.close()
            restore_signal()
            if writer is not None:
                writer.close()
        summary = {"status": stopped, "step": step, "history": history,
                   "checkpoints": os.path.join(loop.workdir, "checkpoints")}
        if stopped == "done" and loop.export and export is not None:
            final = os.path.join(loop.workdir, "final")
            summary["final"] = export_final(model_cfg, combine(state["params"], frozen), final, export)
            log(f"exported {summary['final']}")
    except BaseException as e:
        with contextlib.suppress(BaseException):  # stop orbax's threads before the error propagates
            mngr.close()
        err = ckpt_lib.os_error(e, os.path.join(loop.workdir, "checkpoints"))
        if err is not None:  # a full / read-only disk during a save: an OSError naming the directory
            raise err from None
        raise
    summary["state"] = state
    mngr.close()
    return summary


def export_final(cfg: ModelConfig, params, dst: str, write: Callable) -> str:
    """Gather the model params (LoRA already merged by the step's `combine`) to host; process 0 writes them with
    write(cfg, params, dst) (atomic, replaces an old one)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        write(cfg, jax.tree.map(np.asarray, params), dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dlmjax_export_final")
    return dst


def checkpoint_writer(tokenizer_dir: str | None, tokenizer) -> Callable:
    """export writer: a dlmjax checkpoint with the tokenizer files (from tokenizer_dir, or saved from `tokenizer`)."""
    def write(cfg, params, dst):
        if tokenizer_dir is None:
            import tempfile

            with tempfile.TemporaryDirectory() as td:
                tokenizer.save_pretrained(td)
                save_checkpoint(cfg, params, dst, tokenizer_dir=td, overwrite=True)
        else:
            save_checkpoint(cfg, params, dst, tokenizer_dir=tokenizer_dir, overwrite=True)
    return write
