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
from dlmjax.data.pipeline import SFTDataConfig, build_examples, file_fingerprint, make_iterator
from dlmjax.data.sft import DataError, sft_special_ids
from dlmjax.model.transformer import init_params
from dlmjax import sharding as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig, TrainJob, checkpoint_writer, run_loop
from dlmjax.train.objectives import make_objective

DATA_KEYS = ("input_ids", "maskable", "length", "bucket")
# Fields that must agree between a checkpoint and the run resuming from it. data_fingerprint: the data file's size +
# hash of its first / last MiB (data.pipeline.file_fingerprint), so a file changed under the same path is refused.
RESUME_KEYS = ("model", "objective", "lora", "seed", "global_batch", "data_path", "data_fingerprint", "max_length")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTRunConfig:
    """Everything one SFT run needs besides the model, its params and the tokenizer.

    The step count lives in `loop.steps` and the global batch in `data.global_batch_size`: `optim` (its
    total_steps) and `step` (its global_batch) default to the ones derived from them, and when given they are checked
    against them here, once (a ValueError naming both fields).
    """

    loop: LoopConfig  # workdir, steps, saves, logging
    data: SFTDataConfig  # the data file, row length L, global batch size, data seed
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig | None = None  # None: OptimConfig(total_steps=loop.steps) (defaults otherwise)
    step: StepConfig | None = None  # None: StepConfig(global_batch=data.global_batch_size, seed=data.seed)
    mesh: MeshConfig = MeshConfig()
    lora: LoRAConfig = LoRAConfig()
    tokenizer_dir: str | None = None  # tokenizer files copied into the exported checkpoint (None: saved from it)

    def __post_init__(self):
        if self.optim is None:
            object.__setattr__(self, "optim", OptimConfig(total_steps=self.loop.steps))
        if self.step is None:
            object.__setattr__(self, "step", StepConfig(global_batch=self.data.global_batch_size, seed=self.data.seed))
        if self.data.global_batch_size != self.step.global_batch:
            raise ValueError(f"data.global_batch_size={self.data.global_batch_size} != "
                             f"step.global_batch={self.step.global_batch}: one batch size per run")
        if self.optim.total_steps != self.loop.steps:
            raise ValueError(f"optim.total_steps={self.optim.total_steps} != loop.steps={self.loop.steps}: one step "
                             "count per run")

    @property
    def steps(self) -> int:
        return self.loop.steps

    @property
    def batch_size(self) -> int:
        return self.data.global_batch_size


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


def run_sft(run: SFTRunConfig, model_cfg: ModelConfig, params, tokenizer, log=print) -> dict:
    """Train; returns the loop's summary (losses per logged step, tokens/s, where the checkpoints are) + data stats."""
    data, oc, sc = run.data, run.objective, run.step
    check_tokenizer(model_cfg, tokenizer, run.tokenizer_dir or "tokenizer")
    fingerprint = file_fingerprint(data.path)  # before reading: a change while reading shows at the next resume
    examples, dstats = build_examples(data, tokenizer)
    log(f"data: {json.dumps(dstats)}")
    if oc.kind == "trims" and "bucket" not in examples[0]:
        raise DataError(f"{data.path}: objective=trims needs a 'bucket' field per record (run --job=trims_score)")
    if len(examples) < sc.global_batch:
        raise DataError(f"{data.path}: {len(examples)} usable examples, fewer than one batch of {sc.global_batch}")
    pad_id, _ = sft_special_ids(tokenizer)
    it = make_iterator(data, examples, pad_id=pad_id, process_index=jax.process_index(),
                       process_count=jax.process_count())
    mesh = mesh_lib.make_mesh(run.mesh)
    objective = make_objective(model_cfg, oc, sc.global_batch, mesh)
    keys = [k for k in DATA_KEYS if k in objective.batch_keys]
    noised = step_lib.make_add_noise(mesh)

    def advance(ctx, state, frozen, step):
        local = next(it)
        batch = mesh_lib.global_batch(ctx.mesh, {k: local[k] for k in keys})
        return ctx.step_fn(state, frozen, noised(batch, step_lib.step_noise(ctx.seed, step)))

    meta = {"model": dataclasses.asdict(model_cfg), "objective": dataclasses.asdict(oc),
            "lora": dataclasses.asdict(run.lora), "seed": sc.seed, "global_batch": sc.global_batch,
            "data_path": os.path.abspath(data.path), "data_fingerprint": fingerprint,
            "max_length": data.max_length}
    train_job = TrainJob(name="sft", objective=objective, advance=advance, data_iter=it, meta=meta,
                         resume_keys=RESUME_KEYS, tokens_per_step=sc.global_batch * data.max_length,
                         headline=("loss", "masked_acc"))
    summary = run_loop(run.loop, model_cfg, params, train_job, run.optim, sc, run.mesh, run.lora,
                       export=checkpoint_writer(run.tokenizer_dir, tokenizer), log=log)
    summary["data"] = dstats
    return summary


def build_model(cfg: ModelConfig, seed: int):
    """Random init for training from scratch (the demo)."""
    return init_params(cfg, jax.random.key(seed))
