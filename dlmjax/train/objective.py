"""The objective contract: what the generic train step needs to know about a loss, and nothing else.

An objective is a frozen record: `loss_fn(params, batch) -> (loss, sums)` over one micro-batch, the batch keys it reads,
and `metrics(sums) -> dict` turning the additive per-micro-batch `sums` (accumulated over micro-batches) into logged
numbers. Noise comes from the batch (per-row keys / uniforms / pre-built masked rows placed by the batch builder), never
from the step counter, so the same batch gives the same loss in every pass (old-policy pass, PPO epochs, resume).

`reduce` says how the micro-batch losses of one optimizer step combine:
  mean -- HF Trainer semantics: each micro-batch loss is normalised on its own, the optimizer sees their mean
          (SFT objectives; spec trims_mdlm.md §3.3);
  sum  -- the loss is already divided by the step's global normaliser (e.g. the real row count, carried in the batch),
          so micro-batch losses add up (RL objectives: padding rows weigh 0 and do not shrink the gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective as the step sees it (see the module docstring)."""

    name: str
    loss_fn: Callable  # (params, batch) -> (loss f32 [], sums {name: f32 []}) for one micro-batch
    batch_keys: tuple  # keys of the batch the loss reads (the batch builder must supply each, leading dim = rows)
    metrics: Callable  # (summed sums) -> {name: scalar}; runs inside the jitted step
    reduce: str = "mean"
    # (params, batch) -> [B, T] f32 log pi of each target token (0 off-target): what an old-policy pass records.
    logprobs: Callable | None = None

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"Objective {self.name!r}: reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if not self.batch_keys:
            raise ValueError(f"Objective {self.name!r}: batch_keys is empty")


# --- noise carried in the batch --------------------------------------------------------------------------------------

NOISE_KEYS = ("row", "noise_key", "noise_u0")
ANTITHETIC_SALT = 0x7FFFFFFF  # fold_in salt of the batch-wide antithetic offset u0


def add_noise(batch: dict, key) -> dict:
    """The batch builder's noise fields for a batch of B rows (traceable; leading dim B everywhere):
    row [B] int32 global row index, noise_key [B, 2] uint32 = fold_in(key, row), noise_u0 [B] f32 the batch-wide
    antithetic offset (one value, repeated so micro-batching can split it like every other field).
    `key` is the step's key (the loop uses fold_in(PRNGKey(seed), step)); a batch keeps its masks in every pass."""
    import jax
    import jax.numpy as jnp

    from dlmjax.train import noise

    b = next(iter(batch.values())).shape[0]
    rows = batch["row"] if "row" in batch else jnp.arange(b, dtype=jnp.int32)
    u0 = jax.random.uniform(jax.random.fold_in(key, ANTITHETIC_SALT), (), jnp.float32)
    return {**batch, "row": rows, "noise_key": noise.row_keys(key, rows),
            "noise_u0": jnp.broadcast_to(u0, (b,))}
