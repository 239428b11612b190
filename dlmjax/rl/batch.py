"""From rollouts to a training batch: the objective's rows (SLIM / TraceRL / random / coupled) and the padded,
minibatch-scaled NumPy batch every pass (old policy, each update) reads unchanged.

batch (leading dim R = a multiple of the minibatch size; dummy rows at the end):
  input_ids  [R, N] int32   [prompt | clean response | noisy response], N = L0 + 2 L1
  positions  [R, N] int32   layout.positions
  prompt_valid [R, L0] bool real prompt tokens
  targets    [R, L1] bool   predicted positions (p_mask)
  resp_len   [R] int32      real response tokens (mask-ratio denominator)
  adv        [R] f32        the source rollout's advantage
  weight     [R] f32        quadrature weight (1 for TraceRL / random rows; 0 on dummy rows)
  row_scale  [R] f32        1 / real rows of the row's optimizer minibatch (0 on dummy rows): losses are
                            sum_rows row_scale * per-row loss, so dummy rows never shrink the gradient
  rollout    [R] int32      index of the source rollout (-1 on dummy rows)
  logp_old   [R, L1] f32    zeros; the old-policy pass fills it
  step_id    [R, L1] int32  TraceRL rows only: the (shrunk) step id of each target, -1 elsewhere and on dummy rows
                            (what TraceRL's value model groups its step-level returns by, rl/value.py)
"""

from __future__ import annotations

import numpy as np

from dlmjax.rl.config import RLObjectiveConfig
from dlmjax.rl.layout import Packed, positions
from dlmjax.rl.masking import Rows, random_rows, slim_rows
from dlmjax.rl.slicing import tracerl_rows


def build_rows(rc: RLObjectiveConfig, packed: Packed, mask_id: int, rng: np.random.Generator) -> Rows:
    """The configured objective's rows, in training order (SLIM: 3 replicas of a rollout adjacent; coupled:
    complements after all primaries). `rng`: the caller seeds it from (seed, outer step); TraceRL draws nothing."""
    if rc.objective == "slim":
        return slim_rows(packed, mask_id, rng, rc.block_size, rc.num_quadrature_points, rc.mask_spread,
                         rc.mask_shape, rc.mask_increasing, rc.block_align)
    if rc.objective == "tracerl":
        return tracerl_rows(packed, mask_id, rc.block_size, rc.shrink, rc.block_align)
    return random_rows(packed, mask_id, rng, rc.lower_p, rc.upper_p, coupled=rc.objective == "coupled")


def make_batch(packed: Packed, rows: Rows, adv, minibatch: int) -> dict:
    """The batch of `rows` (see the module docstring), padded with dummy rows to a multiple of `minibatch` (rows per
    optimizer step). Rows keep their order; minibatch m holds rows [m * minibatch, (m + 1) * minibatch). adv: [n]
    per rollout. No rows -> a batch with R = 0 (the caller skips the update)."""
    if minibatch <= 0:
        raise ValueError(f"make_batch: minibatch={minibatch} must be > 0")
    adv = np.asarray(adv, np.float32).reshape(-1)
    if adv.shape[0] != packed.n:
        raise ValueError(f"make_batch: {adv.shape[0]} advantages for {packed.n} rollouts")
    real = len(rows)
    total = -(-real // minibatch) * minibatch
    pad = total - real
    ro = rows.rollout.astype(np.int64)
    l1 = packed.l1

    def padded(x, fill):
        return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)]) if pad else x

    prompt_valid = padded(packed.prompt_valid[ro], False)  # [R, L0]
    ids = np.concatenate([packed.prompt[ro], packed.response[ro], rows.noisy], axis=-1).astype(np.int32)
    counts = np.minimum(minibatch, real - np.arange(0, total, minibatch))  # real rows per minibatch
    scale = np.repeat(1.0 / np.maximum(counts, 1), minibatch).astype(np.float32)
    scale[real:] = 0.0
    extra = {} if rows.step is None else {"step_id": padded(rows.step.astype(np.int32), -1)}
    return {
        "input_ids": padded(ids, packed.pad_id),
        "positions": positions(prompt_valid, l1),
        "prompt_valid": prompt_valid,
        "targets": padded(rows.targets.astype(bool), False),
        "resp_len": padded(packed.resp_len[ro].astype(np.int32), 0),
        "adv": padded(adv[ro], 0.0),
        "weight": padded(rows.weight.astype(np.float32), 0.0),
        "row_scale": scale,
        "rollout": padded(rows.rollout.astype(np.int32), -1),
        "logp_old": np.zeros((total, l1), np.float32),
        **extra,
    }


def split_minibatches(batch: dict, minibatch: int):
    """The batch's optimizer minibatches in order: a list of dicts of `minibatch` rows each."""
    total = batch["input_ids"].shape[0]
    return [{k: v[i:i + minibatch] for k, v in batch.items()} for i in range(0, total, minibatch)]
