"""The SFT job: a thin job on the training loop (train/loop.py) — the SFT data iterator, its batch keys and noise,
the resume fields, and the export of the fine-tuned checkpoint.

Same seed + same flags = same run; a run resumed from its last checkpoint continues bit-for-bit (the iterator
position, params and optimizer state are restored; each step's noise is fold_in(PRNGKey(seed), step), placed in the
batch).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from dlmjax.config import ModelConfig
from dlmjax.data.pipeline import SFTDataConfig, build_examples, make_iterator
from dlmjax.data.sft import DataError, sft_special_ids
from dlmjax.model.transformer import init_params
from dlmjax import sharding as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig, TrainJob, checkpoint_writer, run_loop
from dlmjax.train.objectives import make_objective

DATA_KEYS = ("input_ids", "maskable", "length", "bucket")
# Fields that must agree between a checkpoint and the run resuming from it.
RESUME_KEYS = ("model", "objective", "lora", "seed", "global_batch", "data_path", "max_length")
SFTJobConfig = LoopConfig  # the SFT job's loop settings (workdir, steps, saves, logging)


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


def run_sft(job: LoopConfig, model_cfg: ModelConfig, params, tokenizer, data: SFTDataConfig, oc: ObjectiveConfig,
            opt: OptimConfig, sc: StepConfig, mc: MeshConfig, lc: LoRAConfig, tokenizer_dir: str | None = None,
            log=print) -> dict:
    """Train; returns the loop's summary (losses per logged step, tokens/s, where the checkpoints are) + data stats."""
    if data.global_batch_size != sc.global_batch:
        raise ValueError(f"data batch {data.global_batch_size} != step batch {sc.global_batch}")
    if opt.total_steps != job.steps:
        raise ValueError(f"optimizer total_steps {opt.total_steps} != steps {job.steps}")
    check_tokenizer(model_cfg, tokenizer, tokenizer_dir or "tokenizer")
    examples, dstats = build_examples(data, tokenizer)
    log(f"data: {json.dumps(dstats)}")
    if oc.kind == "trims" and "bucket" not in examples[0]:
        raise DataError(f"{data.path}: objective=trims needs a 'bucket' field per record (run --job=trims_score)")
    if len(examples) < sc.global_batch:
        raise DataError(f"{data.path}: {len(examples)} usable examples, fewer than one batch of {sc.global_batch}")
    pad_id, _ = sft_special_ids(tokenizer)
    it = make_iterator(data, examples, pad_id=pad_id, process_index=jax.process_index(),
                       process_count=jax.process_count())
    mesh = mesh_lib.make_mesh(mc)
    objective = make_objective(model_cfg, oc, sc.global_batch, mesh)
    keys = [k for k in DATA_KEYS if k in objective.batch_keys]
    noised = step_lib.make_add_noise(mesh)

    def advance(ctx, state, frozen, step):
        local = next(it)
        batch = mesh_lib.global_batch(ctx.mesh, {k: local[k] for k in keys})
        return ctx.step_fn(state, frozen, noised(batch, step_lib.step_noise(ctx.seed, step)))

    meta = {"model": dataclasses.asdict(model_cfg), "objective": dataclasses.asdict(oc),
            "lora": dataclasses.asdict(lc), "seed": sc.seed, "global_batch": sc.global_batch,
            "data_path": os.path.abspath(data.path), "max_length": data.max_length}
    train_job = TrainJob(name="sft", objective=objective, advance=advance, data_iter=it, meta=meta,
                         resume_keys=RESUME_KEYS, tokens_per_step=sc.global_batch * data.max_length,
                         headline=("loss", "masked_acc"))
    summary = run_loop(job, model_cfg, params, train_job, opt, sc, mc, lc,
                       export=checkpoint_writer(tokenizer_dir, tokenizer), log=log)
    summary["data"] = dstats
    return summary


def build_model(cfg: ModelConfig, seed: int):
    """Random init for training from scratch (the demo)."""
    return init_params(cfg, jax.random.key(seed))
