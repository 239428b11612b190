"""The RL objectives (slim | tracerl | random | coupled) as `Objective` records (train/objective.py, reduce="sum").

The batch is the materialised one of rl/batch.py (noisy ids in it), so the old-policy pass (`Objective.logprobs`)
and every update see the same rows. The forward runs the extended [prompt | clean | noisy] rows through the model
with explicit positions and the [R, N, N] block mask, reads the hidden states at the L1 noisy positions and takes
log pi of the clean token there (SDAR predicts in place: no logit shift).
"""

from __future__ import annotations

import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.model.transformer import hidden_states
from dlmjax.rl import losses
from dlmjax.rl.config import RLObjectiveConfig
from dlmjax.rl.layout import extended_attention_mask
from dlmjax.train.objective import Objective
from dlmjax.train.objectives import head_ce, masked_head_ce

F32 = jnp.float32
RL_BATCH_KEYS = ("input_ids", "positions", "prompt_valid", "targets", "resp_len", "adv", "weight", "row_scale",
                 "logp_old")


def rl_token_logprobs(cfg: ModelConfig, params, batch: dict, k: int, head_rows: int = 0, align: str = "response",
                      constrain=None):
    """[R, L1] f32 log pi of the clean response token at each noisy position, on the targets (0 elsewhere).

    batch: input_ids [R, N], positions [R, N], prompt_valid [R, L0], targets [R, L1]. head_rows > 0: the LM head
    only on target positions, chunks of that many rows (masked_head_ce); 0: the dense head over [R, L1, V].
    constrain: optional fn on the noisy hidden states [R, L1, D] (a sharding constraint)."""
    if cfg.logit_shift:
        raise ValueError(f"RL rows predict in place (SDAR); the {cfg.family} model shifts its logits")
    ids, pv, targets = batch["input_ids"], batch["prompt_valid"], batch["targets"]
    l0, l1 = pv.shape[1], targets.shape[1]
    if ids.shape[1] != l0 + 2 * l1:
        raise ValueError(f"rl_token_logprobs: input_ids has {ids.shape[1]} columns, expected L0 + 2 L1 = "
                         f"{l0} + 2 * {l1}")
    mask = extended_attention_mask(l0, l1, k, pv, align)  # [R, N, N]
    h, _ = hidden_states(cfg, params, ids, batch["positions"], mask)  # [R, N, D]
    hn = h[:, l0 + l1:]  # [R, L1, D] noisy positions
    if constrain is not None:
        hn = constrain(hn)
    labels = ids[:, l0:l0 + l1]  # [R, L1] clean response
    if head_rows > 0:
        ce, _ = masked_head_ce(cfg, params, hn, labels, targets, head_rows)
    else:
        ce, _ = head_ce(cfg, params, hn, labels)
    return jnp.where(targets, -ce, 0.0).astype(F32)


def loss_from_logprobs(rc: RLObjectiveConfig, logp, batch: dict, token_adv: bool = False):
    """(loss, sums) of the configured level from logp [R, L1] and the batch (see rl/losses.py); adds n_resp.
    token_adv: read the per-token advantage batch["adv_tok"] [R, L1] (TraceRL's value model, rl/value.py) instead
    of the per-row batch["adv"] [R]; token level only."""
    level = rc.loss_level
    if token_adv and level != "token":
        raise ValueError(f"a per-token advantage needs the token-level loss, not {level!r}")
    adv = batch["adv_tok"] if token_adv else batch["adv"]
    args = (logp, batch["logp_old"], batch["targets"], adv.astype(F32), batch["weight"].astype(F32),
            batch["row_scale"].astype(F32))
    if level == "sequence":
        loss, sums = losses.sequence_loss(*args, rc.clip_ratio_low, rc.clip_ratio_high, rc.beta, rc.kl_estimator)
    elif level == "token":
        loss, sums = losses.token_loss(*args, rc.eps, rc.beta, rc.kl_estimator, weighted=rc.objective == "slim")
    else:
        k, l1 = rc.block_size, logp.shape[1]
        if rc.block_align == "absolute":
            off = batch["prompt_valid"].sum(-1).astype(jnp.int32) % k  # [R]
            nb = (k - 1 + l1 - 1) // k + 1
        else:
            off = jnp.zeros(logp.shape[:1], jnp.int32)
            nb = (l1 - 1) // k + 1
        blocks = (off[:, None] + jnp.arange(l1)[None]) // k  # [R, L1]
        loss, sums = losses.block_loss(*args, blocks, nb, rc.clip_ratio_low, rc.clip_ratio_high, rc.beta,
                                       rc.kl_estimator)
    real = (batch["row_scale"] > 0).astype(F32)
    sums["n_resp"] = jnp.sum(real * batch["resp_len"].astype(F32))
    return loss, sums


def rl_metrics(sums: dict) -> dict:
    """Logged numbers from the summed counters: policy / KL parts of the loss, KL mean per row, mean importance
    ratio, clip fraction (per the level's unit), real rows, targets, mask ratio = targets / non-pad response
    tokens."""
    def div(a, b):
        return sums[a] / jnp.maximum(sums[b], 1.0)

    return {"loss_policy": sums["policy"], "loss_kl": sums["kl_term"], "kl": div("kl_sum", "n_rows"),
            "ratio": div("ratio_sum", "ratio_count"), "clip_frac": div("clip_count", "clip_total"),
            "rows": sums["n_rows"], "targets": sums["n_targets"], "mask_ratio": div("n_targets", "n_resp")}


def make_rl_objective(cfg: ModelConfig, rc: RLObjectiveConfig, mesh=None, token_adv: bool = False) -> Objective:
    """The RL objective: loss_fn(params, batch) -> (loss, sums) with reduce="sum" (row_scale already divides by the
    minibatch's real rows), logprobs(params, batch) -> [R, L1] for the old-policy pass, rl_metrics.
    mesh: pins the noisy hidden states' batch dim to the (data, fsdp) axes; a batch split over devices uses the
    dense head (the masked head's gather would all-gather the hidden states).
    token_adv: the loss reads the per-token advantage "adv_tok" [R, L1] (TraceRL with its value model, §2.6)."""
    if token_adv and rc.loss_level != "token":
        raise ValueError(f"a per-token advantage needs the token-level loss ({rc.objective} uses {rc.loss_level})")
    constrain = None
    head_rows = rc.head_rows
    if mesh is not None:
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        spec = NamedSharding(mesh, P(("data", "fsdp"), None, None))
        constrain = lambda h: jax.lax.with_sharding_constraint(h, spec)  # noqa: E731
        if mesh.shape["data"] * mesh.shape["fsdp"] > 1:
            head_rows = 0

    def logprobs(params, batch):
        return rl_token_logprobs(cfg, params, batch, rc.block_size, head_rows, rc.block_align, constrain)

    def loss_fn(params, batch):
        return loss_from_logprobs(rc, logprobs(params, batch), batch, token_adv)

    keys = RL_BATCH_KEYS + (("adv_tok",) if token_adv else ())
    return Objective(name=rc.objective, loss_fn=loss_fn, batch_keys=keys, metrics=rl_metrics, reduce="sum",
                     logprobs=logprobs)
