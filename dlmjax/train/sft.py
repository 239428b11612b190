"""The SFT job: data -> sharded jitted steps -> orbax checkpoints, metrics (progress bar, log lines, TensorBoard) ->
an exportable dlmjax checkpoint with any LoRA merged.

Same seed + same flags = same run; a run resumed from its last checkpoint continues bit-for-bit (the iterator
position, params and optimizer state are restored; each step's key is fold_in(PRNGKey(seed), step)).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
import numpy as np

from dlmjax.checkpoint import train_state as ckpt_lib
from dlmjax.checkpoint.convert import save_checkpoint
from dlmjax.config import ModelConfig
from dlmjax.data.pipeline import SFTDataConfig, build_examples, make_iterator
from dlmjax.data.sft import DataError, sft_special_ids
from dlmjax.model.transformer import init_params
from dlmjax.train import mesh as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.objectives import make_objective

BATCH_KEYS = ("input_ids", "maskable", "length", "bucket")
# Fields that must agree between a checkpoint and the run resuming from it.
RESUME_KEYS = ("model", "objective", "lora", "seed", "global_batch", "data_path", "max_length")


@dataclasses.dataclass(frozen=True)
class SFTJobConfig:
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


def check_tokenizer(cfg: ModelConfig, tokenizer, where: str):
    """The tokenizer must fit the checkpoint: ids inside the vocabulary, a mask token the objective can write."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise DataError(f"{where}: the tokenizer has {n} tokens but the checkpoint's vocabulary has {cfg.vocab_size} "
                        "rows: tokenizer and checkpoint do not match")
    if cfg.mask_token_id is None:
        raise DataError(f"{where}: the checkpoint has no mask_token_id; masked-diffusion training needs one")
    _, eos = sft_special_ids(tokenizer)
    if cfg.eos_token_id is not None and eos != cfg.eos_token_id:
        raise DataError(f"{where}: tokenizer EOS id {eos} != checkpoint eos_token_id {cfg.eos_token_id}: tokenizer and "
                        "checkpoint do not match")


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


def _writer(job: SFTJobConfig):
    if not job.tensorboard or jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(job.workdir, "tb"))


def run_sft(job: SFTJobConfig, model_cfg: ModelConfig, params, tokenizer, data: SFTDataConfig, oc: ObjectiveConfig,
            opt: OptimConfig, sc: StepConfig, mc: MeshConfig, lc: LoRAConfig, tokenizer_dir: str | None = None,
            log=print) -> dict:
    """Train; returns a summary (losses per logged step, tokens/s, where the checkpoints are)."""
    if data.global_batch_size != sc.global_batch:
        raise ValueError(f"data batch {data.global_batch_size} != step batch {sc.global_batch}")
    if opt.total_steps != job.steps:
        raise ValueError(f"optimizer total_steps {opt.total_steps} != steps {job.steps}")
    check_tokenizer(model_cfg, tokenizer, tokenizer_dir or "tokenizer")
    os.makedirs(job.workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(mc)
    examples, dstats = build_examples(data, tokenizer)
    log(f"data: {json.dumps(dstats)}")
    if oc.kind == "trims" and "bucket" not in examples[0]:
        raise DataError(f"{data.path}: objective=trims needs a 'bucket' field per record (run --job=trims_score)")
    if len(examples) < sc.global_batch:
        raise DataError(f"{data.path}: {len(examples)} usable examples, fewer than one batch of {sc.global_batch}")
    pad_id, _ = sft_special_ids(tokenizer)
    it = make_iterator(data, examples, pad_id=pad_id, process_index=jax.process_index(),
                       process_count=jax.process_count())

    tx = step_lib.make_optimizer(opt)
    split, combine = step_lib.trainable_view(lc, params)
    trainable, frozen = split(params, jax.random.key(sc.seed + 1))
    state, state_sh = step_lib.init_state(mesh, tx, trainable)
    frozen_sh = None
    if frozen is not None:
        frozen_sh = mesh_lib.shardings(mesh, mesh_lib.param_specs(mesh, frozen))
        frozen = jax.device_put(frozen, frozen_sh)
    del params, trainable

    meta = {"model": dataclasses.asdict(model_cfg), "objective": dataclasses.asdict(oc),
            "lora": dataclasses.asdict(lc), "seed": sc.seed, "global_batch": sc.global_batch,
            "data_path": os.path.abspath(data.path), "max_length": data.max_length}
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as they come back from JSON
    mngr = ckpt_lib.manager(os.path.join(job.workdir, "checkpoints"), job.save_every, job.keep, job.async_save)
    start = 0
    latest = mngr.latest_step() if job.resume else None
    if latest is not None:
        ckpt_lib.check_compatible(ckpt_lib.read_meta(mngr, latest), meta, RESUME_KEYS,
                                  os.path.join(job.workdir, "checkpoints", str(latest)))
        state, _ = ckpt_lib.restore(mngr, latest, ckpt_lib.abstract_like(state, state_sh), it)
        start = int(latest)
        log(f"resumed from step {start} ({os.path.join(job.workdir, 'checkpoints')})")

    batch_sh = {k: jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh, 2 if k != "length" else 1))
                for k in BATCH_KEYS if k != "bucket" or oc.kind == "trims"}
    loss_fn = make_objective(model_cfg, oc, sc.global_batch, mesh)
    step_fn = step_lib.make_train_step(loss_fn, sc, opt, tx, combine, mesh, state_sh, frozen_sh, batch_sh)
    key = jax.random.key(sc.seed)
    tokens_per_step = sc.global_batch * data.max_length
    writer = _writer(job)
    preempted, restore_signal = _install_sigterm()
    history, pending = [], []
    show = jax.process_index() == 0
    from tqdm import tqdm

    bar = tqdm(total=job.steps, initial=start, desc="sft", disable=not show, dynamic_ncols=True, mininterval=1.0)
    t_log, step, stopped = time.perf_counter(), start, "done"
    try:
        while step < job.steps:
            local = next(it)
            batch = mesh_lib.global_batch(mesh, {k: local[k] for k in batch_sh})
            state, metrics = step_fn(state, frozen, batch, key)
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            if step % job.log_every == 0 or step == job.steps:
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
                row["tokens_per_s"] = tokens_per_step * len(pending) / dt
                row["step_time_s"] = dt / len(pending)
                if writer is not None:
                    writer.add_scalar("train/tokens_per_s", row["tokens_per_s"], step)
                    writer.add_scalar("train/step_time_s", row["step_time_s"], step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['masked_acc']:.3f}")
                log(f"step {step}/{job.steps} loss {row['loss']:.4f} masked_acc {row['masked_acc']:.3f} "
                    f"grad_norm {row['grad_norm']:.3f} lr {row['lr']:.2e} tokens/s {row['tokens_per_s']:.0f} "
                    f"step {row['step_time_s'] * 1e3:.0f} ms")
                pending, t_log = [], time.perf_counter()
            pre = preempted(step)  # multi-process: a collective decision; call it once at every step
            if pre or (job.stop_at and step >= job.stop_at and step < job.steps):
                stopped = "preempted" if pre else "stopped"
                break
            ckpt_lib.save(mngr, step, state, it, meta)
        mngr.wait_until_finished()
        if step not in mngr.all_steps():
            ckpt_lib.save(mngr, step, state, it, meta, force=True)
        mngr.wait_until_finished()
        if stopped != "done":
            log(f"{stopped} at step {step}/{job.steps}; checkpoint saved, rerun to resume")
    finally:
        bar.close()
        restore_signal()
        if writer is not None:
            writer.close()
    summary = {"status": stopped, "step": step, "history": history, "data": dstats,
               "checkpoints": os.path.join(job.workdir, "checkpoints")}
    if stopped == "done" and job.export:
        final = os.path.join(job.workdir, "final")
        summary["final"] = export_final(model_cfg, combine(state["params"], frozen), final, tokenizer_dir, tokenizer)
        log(f"exported {summary['final']}")
    summary["state"] = state
    mngr.close()
    return summary


def export_final(cfg: ModelConfig, params, dst: str, tokenizer_dir, tokenizer) -> str:
    """Gather the model params (LoRA already merged by the step's `combine`) to host and write a dlmjax checkpoint
    (process 0; atomic, replaces an old one)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        params = jax.tree.map(np.asarray, params)
        if tokenizer_dir is None:
            import tempfile

            with tempfile.TemporaryDirectory() as td:
                tokenizer.save_pretrained(td)
                save_checkpoint(cfg, params, dst, tokenizer_dir=td, overwrite=True)
        else:
            save_checkpoint(cfg, params, dst, tokenizer_dir=tokenizer_dir, overwrite=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dlmjax_export_final")
    return dst


def build_model(cfg: ModelConfig, seed: int):
    """Random init for training from scratch (the demo)."""
    return init_params(cfg, jax.random.key(seed))
