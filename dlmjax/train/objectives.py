"""The masked-diffusion SFT objectives (MDLM, BD3LM, TRIMS) as `Objective` records (train/objective.py).

batch: {"input_ids": [B, L] int32, "maskable": [B, L] bool (response + trained pads), "length": [B] int32,
        ("bucket": [B, L] int8 for TRIMS), and the noise fields of `objective.add_noise` (row, noise_key, noise_u0)}.
sums: additive per-micro-batch counters that `sft_metrics` turns into metrics (masked-token accuracy, masked fraction).

The objectives follow dLLM's trainers (spec trims_mdlm.md §3.3 MDLM, §4 BD3LM, §5 TRIMS): CE against the clean
ids at masked positions, a per-token weight, and token / sequence / batch normalisation of one micro-batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.model.transformer import hidden_states, lm_head, shift_logits
from dlmjax.train import noise
from dlmjax.train.config import ObjectiveConfig
from dlmjax.train.objective import Objective

F32 = jnp.float32
SFT_BATCH_KEYS = ("input_ids", "maskable", "length", "row", "noise_key", "noise_u0")


def head_ce(cfg: ModelConfig, params, h, targets):
    """(CE [B, L] f32, target has the top logit [B, L]) of the LM head on hidden states h [B, L, D].

    Accuracy is `logit[target] == max logit` (a tie counts as correct), not `argmax == target`: the max is the one
    the log-sum-exp already takes, while an argmax is another full pass over [B, L, V] (~1 s per step at 8 x 512 x
    49k on 2 CPU cores)."""
    logits = lm_head(cfg, params, h).astype(F32)  # [B, L, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - tgt, tgt >= jnp.max(logits, axis=-1)


def chunked_head_ce(cfg: ModelConfig, params, h, targets, chunk: int):
    """head_ce over sequence chunks under remat, so [B, L, V] f32 logits never exist (only [B, chunk, V])."""
    b, n, d = h.shape
    if chunk <= 0 or chunk >= n:
        return head_ce(cfg, params, h, targets)
    if n % chunk:
        raise ValueError(f"ce_chunk={chunk} does not divide the sequence length {n}")
    hs = h.reshape(b, n // chunk, chunk, d).swapaxes(0, 1)  # [n/c, B, c, D]
    ts = targets.reshape(b, n // chunk, chunk).swapaxes(0, 1)
    fn = jax.checkpoint(lambda hc, tc: head_ce(cfg, params, hc, tc))
    _, (ce, ok) = jax.lax.scan(lambda c, x: (c, fn(*x)), None, (hs, ts))
    return ce.swapaxes(0, 1).reshape(b, n), ok.swapaxes(0, 1).reshape(b, n)


def masked_head_ce(cfg: ModelConfig, params, h, targets, masked, rows: int):
    """head_ce only where `masked` [B, L] is set (zeros elsewhere): the positions are ordered masked-first, cut
    into chunks of `rows`, and a chunk holding no masked position skips the LM head entirely (lax.cond, also in
    the backward pass; each chunk's logits are recomputed there, never stored). With about a third of the positions
    masked this is ~2.5x fewer head FLOPs than the dense head, the largest matmul of a small model's step."""
    b, n, d = h.shape
    total = b * n
    c = min(rows, total)
    nc = -(-total // c)
    flat_m = masked.reshape(total)
    order = jnp.argsort(~flat_m, stable=True)  # masked positions first, in index order
    count = jnp.sum(flat_m, dtype=jnp.int32)
    pad = nc * c - total
    hs = jnp.pad(jnp.take(h.reshape(total, d), order, axis=0), ((0, pad), (0, 0))).reshape(nc, c, d)
    ts = jnp.pad(jnp.take(targets.reshape(total), order), (0, pad)).reshape(nc, c)
    fn = jax.checkpoint(lambda hc, tc: jax.tree.map(lambda x: x[0], head_ce(cfg, params, hc[None], tc[None])))

    def chunk(_, xs):
        j, hc, tc = xs
        skip = lambda: (jnp.zeros((c,), F32), jnp.zeros((c,), bool))  # noqa: E731
        return None, jax.lax.cond(j * c < count, lambda: fn(hc, tc), skip)

    _, (ce, ok) = jax.lax.scan(chunk, None, (jnp.arange(nc), hs, ts))
    inv = jnp.argsort(order)  # back to [B, L] order
    return ce.reshape(-1)[inv].reshape(b, n), ok.reshape(-1)[inv].reshape(b, n)


def normalise(nll, maskable, mode: str):
    """dLLM's loss_norm_type: token = sum / #maskable; sequence = mean_b(sum_b / #maskable_b); batch = sum / B."""
    if mode == "token":
        return nll.sum() / jnp.maximum(maskable.sum(), 1)
    if mode == "sequence":
        return jnp.mean(nll.sum(-1) / jnp.maximum(maskable.sum(-1), 1))
    return nll.sum() / nll.shape[0]


def _sums(ce, ok, masked, maskable, extra=None):
    m = masked.astype(F32)
    out = {"n_masked": m.sum(), "n_correct": (ok & masked).astype(F32).sum(), "n_maskable": maskable.astype(F32).sum(),
           "ce_masked": (ce * m).sum(), "n_rows": jnp.asarray(masked.shape[0], F32)}
    out.update(extra or {})
    return out


def sft_metrics(sums: dict) -> dict:
    """Masked-token accuracy, masked fraction, mean CE over masked tokens (and TRIMS' trajectory-row fraction)."""
    out = {"masked_acc": sums["n_correct"] / jnp.maximum(sums["n_masked"], 1.0),
           "masked_frac": sums["n_masked"] / jnp.maximum(sums["n_maskable"], 1.0),
           "ce_masked": sums["ce_masked"] / jnp.maximum(sums["n_masked"], 1.0)}
    if "n_traj_rows" in sums:
        out["traj_frac"] = sums["n_traj_rows"] / jnp.maximum(sums["n_rows"], 1.0)
    return out


def bidirectional_forward(cfg: ModelConfig, params, tokens, length, right_shift: bool):
    """Hidden states of the noised rows: LLaDA-style (every key visible, pads too) or Dream-style (pads masked as
    keys, since dLLM's Dream collator keeps the attention mask); shifted by one for Dream's alignment."""
    b, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    if cfg.family == "dream":
        valid = jnp.arange(n)[None, :] < length[:, None]
        mask = jnp.broadcast_to(valid[:, None, :], (b, n, n))
    else:
        mask = None  # every key visible: no masking work in attention
    h, _ = hidden_states(cfg, params, tokens, pos, mask)
    return shift_logits(h) if right_shift else h


def _weights(oc: ObjectiveConfig, t, masked):
    if oc.weight == "cart":
        return noise.cart_weight(masked, oc.cart_p)
    if oc.weight == "uniform":
        return jnp.ones(masked.shape, F32)
    return jnp.broadcast_to(noise.elbo_weight(oc.schedule, t)[:, None], masked.shape)


def make_objective(cfg: ModelConfig, oc: ObjectiveConfig, global_batch: int, mesh=None) -> Objective:
    """The configured objective: loss_fn(params, batch) (noise from the batch's noise fields) and logprobs(params,
    batch) -> [B, L] log p of the clean token at the masked positions (0 elsewhere; no gradient needed).
    global_batch: rows per optimizer step (antithetic time sampling stratifies over it). mesh: pins the activations' batch dim to the (data, fsdp) axes (the hidden
    states [B, L, D] entering the LM head / CE), instead of leaving their layout to GSPMD propagation."""
    def constrain(h):
        if mesh is None:
            return h
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        return jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P(("data", "fsdp"), None, None)))

    batch_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    sparse_head = oc.head_rows > 0 and batch_devices == 1  # a sharded batch would all-gather h for the gather

    def head(params, h, ids, masked):
        if sparse_head:
            return masked_head_ce(cfg, params, h, ids, masked, oc.head_rows)
        return chunked_head_ce(cfg, params, h, ids, oc.ce_chunk)

    if oc.kind in ("mdlm", "trims") and cfg.attention != "bidirectional":
        raise ValueError(f"objective={oc.kind} trains a bidirectional denoiser; the {cfg.family} checkpoint has "
                         f"attention={cfg.attention} (use objective=bd3lm for block-causal SDAR models)")
    shift = cfg.logit_shift if oc.right_shift is None else oc.right_shift
    if oc.kind == "bd3lm" and shift:
        raise ValueError("objective=bd3lm with right-shifted logits is not supported (dLLM's BD3LM trainer has no "
                         "shift; SDAR predicts in place)")

    def times(batch, u):
        u0 = batch["noise_u0"][0] if oc.antithetic else None
        return noise.sample_times(u, oc.time_eps, oc.antithetic, batch["row"], global_batch, u0)

    def mdlm_like(params, batch):
        ids, maskable = batch["input_ids"], batch["maskable"]
        scal, u_tok = noise.uniforms_from_row_keys(batch["noise_key"], ids.shape[1], 3)
        t = times(batch, scal[:, 0])
        extra = {}
        if oc.kind == "trims":
            masked, p, traj, _ = noise.trims_mask(
                scal[:, 1], scal[:, 2], t, u_tok, maskable, batch["bucket"], num_buckets=oc.num_buckets,
                p_high=oc.p_high, p_low=oc.p_low, rho=oc.rho, k_range=oc.k_range, schedule=oc.schedule)
            w_std = _weights(oc, t, masked)
            if oc.weight == "cart":
                w_traj = w_std
            elif oc.trims_weight == "inv_p":
                w_traj = 1.0 / jnp.maximum(p, 1e-6)
            elif oc.trims_weight == "uniform":
                w_traj = jnp.ones_like(p)
            else:  # t_eff: 1 / mean mask probability over the row's maskable tokens
                t_eff = p.sum(-1) / jnp.maximum(maskable.sum(-1), 1)
                w_traj = jnp.broadcast_to((1.0 / jnp.maximum(t_eff, 1e-6))[:, None], p.shape)
            w = jnp.where(traj[:, None], w_traj, w_std)
            extra = {"n_traj_rows": traj.astype(F32).sum()}
        else:
            masked = noise.mdlm_mask(t, u_tok, maskable, oc.schedule)
            w = _weights(oc, t, masked)
        x_t = jnp.where(masked, cfg.mask_token_id, ids)
        h = constrain(bidirectional_forward(cfg, params, x_t, batch["length"], shift))
        ce, ok = head(params, h, ids, masked)
        return ce, ok, masked, maskable, w, extra

    def bd3lm_like(params, batch):
        ids, maskable = batch["input_ids"], batch["maskable"]
        b, n = ids.shape
        if n % oc.block_size:
            raise ValueError(f"bd3lm: sequence length {n} is not a multiple of block_size={oc.block_size}")
        nb = n // oc.block_size
        scal, u_tok = noise.uniforms_from_row_keys(batch["noise_key"], n, max(nb, 1))
        if oc.block_noise == "block":
            t_blk = noise.sample_times(scal[:, :nb], oc.time_eps)  # [B, nb]
            t_tok = jnp.repeat(t_blk, oc.block_size, axis=1)  # [B, L]
        else:
            t_tok = jnp.broadcast_to(times(batch, scal[:, 0])[:, None], (b, n))
        masked = (u_tok < noise.mask_prob(oc.schedule, t_tok)) & maskable
        w = jnp.ones((b, n), F32) if oc.weight == "uniform" else noise.elbo_weight(oc.schedule, t_tok)
        x_t = jnp.where(masked, cfg.mask_token_id, ids)
        tokens = jnp.concatenate([x_t, ids], axis=1)  # [B, 2L] = [x_t ; x_0]
        pos = jnp.broadcast_to(jnp.tile(jnp.arange(n, dtype=jnp.int32), 2), (b, 2 * n))
        mask = jnp.asarray(noise.bd3lm_attention_mask(n, oc.block_size))[None]
        h, _ = hidden_states(cfg, params, tokens, pos, mask)
        ce, ok = head(params, constrain(h[:, :n]), ids, masked)
        return ce, ok, masked, maskable, w, {}

    forward = bd3lm_like if oc.kind == "bd3lm" else mdlm_like

    def loss_fn(params, batch):
        ce, ok, masked, maskable, w, extra = forward(params, batch)
        nll = ce * w * masked
        return normalise(nll, maskable, oc.norm), _sums(ce, ok, masked, maskable, extra)

    def logprobs(params, batch):
        ce, _, masked, _, _, _ = forward(params, batch)
        return jnp.where(masked, -ce, 0.0)

    keys = SFT_BATCH_KEYS + (("bucket",) if oc.kind == "trims" else ())
    return Objective(name=oc.kind, loss_fn=loss_fn, batch_keys=keys, metrics=sft_metrics, reduce="mean",
                     logprobs=logprobs)
