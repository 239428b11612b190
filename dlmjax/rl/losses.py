"""RL policy losses as pure jnp functions of per-token log-probs (spec §1.5 SLIM-RL, §2.4 TraceRL, §7).

Common inputs (R rows, L1 padded response length of the outer step):
  logp, logp_old [R, L1] f32  log pi_theta / log pi_old of the clean token at each noisy position (any value
                              off-target: only targets are read)
  targets [R, L1] bool        p_mask (masked, non-pad positions)
  adv, weight, row_scale [R]  advantage, quadrature weight, 1 / real rows of the minibatch (0 on dummy rows);
                              token_loss also takes a per-token adv [R, L1] (TraceRL with its value model, §2.6)
Returns (loss f32 [], sums): loss = sum_rows row_scale * (-w * surrogate + beta * w * KL), i.e. the reference's
minibatch mean over its B real rows; `sums` are additive counters (over micro-batches) for the metrics:
  policy, kl_term      the two parts of the loss
  kl_sum               sum over real rows of KL_row (unweighted; KL_row = sum_targets k / L1)
  ratio_sum, ratio_count   importance ratios (per row / per block / per target, by level) and their count
  clip_count, clip_total   clipped ratios (sequence, block: s outside [1 - low, 1 + high]; token: |rho - clip| > 1e-8)
  n_rows, n_targets    real rows, targets on real rows
Delta = logp - logp_old is 0 off-target; exponents are clamped to +-10 as in both trainers.
"""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32


def kl_rows(delta, targets, estimator: str = "k3"):
    """[R] KL_row = (1 / L1) sum over targets of k(delta): k1 = d, k2 = d^2 / 2, k3 = exp(clamp(-d, +-10)) - 1 + d
    (normalised by the padded L1, not by the target count)."""
    if estimator == "k3":
        k = jnp.exp(jnp.clip(-delta, -10.0, 10.0)) - 1.0 + delta
    elif estimator == "k2":
        k = 0.5 * delta * delta
    elif estimator == "k1":
        k = delta
    else:
        raise ValueError(f"kl_rows: estimator={estimator!r} is not k1 | k2 | k3")
    return jnp.sum(jnp.where(targets, k, 0.0), axis=-1) / delta.shape[-1]


def _delta(logp, logp_old, targets):
    return jnp.where(targets, logp.astype(F32) - logp_old.astype(F32), 0.0)  # [R, L1]


def _finish(surr, kl, w, row_scale, beta, targets, **counts):
    """loss and sums from per-row surrogates [R] and KLs [R] (w weighs both, as SLIM does)."""
    real = (row_scale > 0).astype(F32)
    policy = jnp.sum(row_scale * (-w * surr))
    kl_term = jnp.sum(row_scale * beta * w * kl)
    sums = {"policy": policy, "kl_term": kl_term, "kl_sum": jnp.sum(real * kl), "n_rows": jnp.sum(real),
            "n_targets": jnp.sum(real[:, None] * targets.astype(F32))}
    sums.update({k: v.astype(F32) for k, v in counts.items()})
    return policy + kl_term, sums


def sequence_loss(logp, logp_old, targets, adv, weight, row_scale, clip_low: float = 0.1, clip_high: float = 0.1,
                  beta: float = 0.01, kl: str = "k3"):
    """SLIM-RL's default (GSPO-style): log s = clamp(mean of delta over targets, +-10) (count clamped >= 1),
    g = min(s A, clip(s, 1 - low, 1 + high) A), per row -w g + beta w KL_row."""
    d = _delta(logp, logp_old, targets)
    n = jnp.maximum(targets.sum(-1), 1).astype(F32)
    s = jnp.exp(jnp.clip(d.sum(-1) / n, -10.0, 10.0))  # [R]
    g = jnp.minimum(s * adv, jnp.clip(s, 1.0 - clip_low, 1.0 + clip_high) * adv)
    real = (row_scale > 0).astype(F32)
    clipped = ((s < 1.0 - clip_low) | (s > 1.0 + clip_high)).astype(F32)
    return _finish(g, kl_rows(d, targets, kl), weight, row_scale, beta, targets,
                   ratio_sum=jnp.sum(real * s), ratio_count=jnp.sum(real), clip_count=jnp.sum(real * clipped),
                   clip_total=jnp.sum(real))


def token_loss(logp, logp_old, targets, adv, weight, row_scale, eps: float = 0.2, beta: float = 0.01,
               kl: str = "k3", weighted: bool = False):
    """Token-level PPO (TraceRL §2.4; SLIM's `token` level): rho = exp(clamp(delta, +-10)), per row
    (1 / L1) sum_targets min(rho A, clip(rho, 1 - eps, 1 + eps) A). weighted=False (TraceRL / random / coupled):
    neither term reads the weight; weighted=True (SLIM token level): both are multiplied by w.
    adv: [R] (the row's rollout advantage, every token) or [R, L1] (a per-token A_j: TraceRL with its value model,
    §2.6 "policy loss = §2.4 with per-token A_j instead of a scalar")."""
    d = _delta(logp, logp_old, targets)
    rho = jnp.exp(jnp.clip(d, -10.0, 10.0))  # [R, L1]
    c = jnp.clip(rho, 1.0 - eps, 1.0 + eps)
    a = adv[:, None] if adv.ndim == 1 else adv  # [R, 1] | [R, L1]
    surr = jnp.sum(jnp.where(targets, jnp.minimum(rho * a, c * a), 0.0), axis=-1) / d.shape[-1]
    on = targets.astype(F32) * (row_scale > 0).astype(F32)[:, None]
    w = weight if weighted else jnp.ones_like(weight)
    return _finish(surr, kl_rows(d, targets, kl), w, row_scale, beta, targets,
                   ratio_sum=jnp.sum(on * rho), ratio_count=jnp.sum(on),
                   clip_count=jnp.sum(on * (jnp.abs(rho - c) > 1e-8)), clip_total=jnp.sum(on))


def block_loss(logp, logp_old, targets, adv, weight, row_scale, blocks, num_blocks: int, clip_low: float = 0.1,
               clip_high: float = 0.1, beta: float = 0.01, kl: str = "k3"):
    """SLIM's `block` level: one ratio per K-block = exp(clamp(mean delta over the block's targets, +-10)), clipped
    to [1 - low, 1 + high]; per row (1 / L1) sum over blocks with targets of (#targets in block) * min(r A, clip A).
    blocks: [R, L1] int block index of each position (< num_blocks, static)."""
    d = _delta(logp, logp_old, targets)
    oh = ((blocks[..., None] == jnp.arange(num_blocks)) & targets[..., None]).astype(F32)  # [R, L1, J]
    cnt = oh.sum(1)  # [R, J]
    has = cnt > 0
    r = jnp.exp(jnp.clip(jnp.einsum("rt,rtj->rj", d, oh) / jnp.maximum(cnt, 1.0), -10.0, 10.0))  # [R, J]
    a = adv[:, None]
    surr_b = jnp.where(has, jnp.minimum(r * a, jnp.clip(r, 1.0 - clip_low, 1.0 + clip_high) * a), 0.0)
    surr = jnp.sum(surr_b * cnt, axis=-1) / d.shape[-1]
    on = has.astype(F32) * (row_scale > 0).astype(F32)[:, None]
    clipped = ((r < 1.0 - clip_low) | (r > 1.0 + clip_high)).astype(F32)
    return _finish(surr, kl_rows(d, targets, kl), weight, row_scale, beta, targets,
                   ratio_sum=jnp.sum(on * r), ratio_count=jnp.sum(on), clip_count=jnp.sum(on * clipped),
                   clip_total=jnp.sum(on))
