"""LLaDA `generate`: fixed canvas, semi-autoregressive blocks, one jit (models_decoders.md §6.1, §6.4.1).

The canvas is [prompt | G masks] with left-padded prompts (pads are key-masked, positions are never re-indexed).
Blocks of `block_length` are decoded left to right; each step runs the model on the whole canvas but computes logits
only for the current block (the only place the rule reads them). Rules:
  low_confidence  LLaDA's static schedule: top sched[i] by p(x0) (confidence in the logits' dtype, bf16 in LLaDA)
  random          LLaDA's random remasking (U(0,1) confidence, same schedule)
  fast_dllm_threshold  Fast-dLLM v1 (June/August 2025): best slot + every slot with c >= tau, float64 confidence;
                  also the dLLM-RL / SLIM-RL LLaDA "dynamic" rule; data-dependent steps per block
  fast_dllm_factor     Fast-dLLM v1 factor rule, float64 confidence
  tau_budget      SLIM-RL's training-free port: candidates c > tau within a budget m(1-tau), floor = schedule count
Steps per block are data dependent for the last three: a while_loop runs until the block has no mask (at most
block_length steps, a guard that cannot bind since each step commits at least one slot).
Fast-dLLM v1's approximate caches (§6.4.2): `prefix` re-runs the canvas from the block start against K/V of the
prefix computed at the block's first step; `dual` runs only the block against K/V of the whole canvas from that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.decode import rules, sampling, stats

RULES = ("low_confidence", "random", "fast_dllm_threshold", "fast_dllm_factor", "tau_budget")
CACHES = ("none", "prefix", "dual")
_F64_DEFAULT = ("fast_dllm_threshold", "fast_dllm_factor", "tau_budget")


@dataclasses.dataclass(frozen=True)
class LLaDADecodeConfig:
    """Static settings of LLaDA decoding. Defaults: LLaDA's generate.py example (gen 128, block 32, 128 steps)."""

    gen_length: int = 128
    block_length: int = 32
    steps: int = 128  # total static steps; steps per block = steps / (gen_length / block_length)
    rule: str = "low_confidence"
    temperature: float = 0.0  # > 0: Gumbel-max with float64 noise (LLaDA's add_gumbel_noise)
    tau: float = 0.9  # threshold / tau-budget tau
    budget_m: float = 1.0
    factor: float = 1.0  # fast_dllm_factor
    conf_dtype: str = ""  # "" = the rule's reference dtype: logits dtype for low_confidence, float64 otherwise
    logits_eos_inf: bool = False  # LLaDA flag: EOS logit -inf before choosing x0
    confidence_eos_eot_inf: bool = False  # LLaDA flag (quirk Q2): EOS/EoT confidence 0 after choosing x0
    eot_token_id: int = 126348
    forbid_mask_token: bool = False
    cache: str = "none"  # none | prefix | dual: Fast-dLLM v1's approximate caches, refreshed at each block start
    cfg_scale: float = 0.0  # > 0: classifier-free guidance l_u + (w + 1)(l_c - l_u), unconditional = prompt masked


    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"LLaDADecodeConfig.rule: {self.rule!r} is not one of {RULES}")
        if self.cache not in CACHES:
            raise ValueError(f"LLaDADecodeConfig.cache: {self.cache!r} is not one of {CACHES}")
        if self.gen_length % self.block_length:
            raise ValueError(f"LLaDADecodeConfig: gen_length={self.gen_length} is not a multiple of "
                             f"block_length={self.block_length}")
        if self.cfg_scale < 0:
            raise ValueError(f"LLaDADecodeConfig.cfg_scale: {self.cfg_scale} must be >= 0")
        def bad(why):
            raise ValueError(f"LLaDADecodeConfig.{why}")

        if not self.temperature >= 0:  # also rejects NaN; 0 = greedy (LLaDA's own convention)
            bad(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        rules.check_tau(self.tau, bad)
        if self.conf_dtype not in ("", "float32", "float64", "bfloat16", "float16"):
            bad(f"conf_dtype={self.conf_dtype!r} is not '' (the rule's default) or a float dtype")
        if self.cfg_scale > 0 and self.cache != "none":
            raise ValueError("LLaDADecodeConfig: cfg_scale > 0 needs cache=none (LLaDA's guidance runs full "
                             "forwards; Fast-dLLM's caches do not combine with it)")
        nb = self.gen_length // self.block_length
        if self.steps % nb:
            raise ValueError(f"LLaDADecodeConfig: steps={self.steps} is not a multiple of the number of blocks {nb}")

    @property
    def steps_per_block(self) -> int:
        return self.steps // (self.gen_length // self.block_length)

    @property
    def confidence_dtype(self):
        return self.conf_dtype or ("float64" if self.rule in _F64_DEFAULT else None)

    def needs_x64(self) -> bool:
        return self.confidence_dtype == "float64" or self.temperature > 0


def _schedule(remaining, steps, i):
    """LLaDA get_num_transfer_tokens: floor(r/s) + (i < r mod s), per row; remaining: [B] masks at block start."""
    return remaining // steps + (i < remaining % steps).astype(jnp.int32)


def generate(cfg: ModelConfig, dc: LLaDADecodeConfig, params, prompts, prompt_valid, key, replay_uniforms=None):
    """prompts: [B, Lp] int32 left-padded, prompt_valid: [B, Lp] bool. Enables x64 when the rule needs float64.

    replay_uniforms: optional [B, T, block_length, V] float64 Gumbel uniforms per row and per row-step (T >= the
    row's number of steps), or [B, T, block_length] float32 uniforms for `random` remasking.
    Returns dict: tokens [B, G], step_map [B, G] (the row's 1-based step of each commit), conf [B, G],
    commits_per_step [B, T], n_forward [B] (steps in which the row still had masks), tpf [B], ewc [B], canvas.
    """
    ctx = jax.enable_x64(True) if dc.needs_x64() else contextlib.nullcontext()
    with ctx:
        return _generate(cfg, dc, params, prompts, prompt_valid, key, replay_uniforms)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(cfg, dc, params, prompts, prompt_valid, key, replay_uniforms):
    b, lp = prompts.shape
    g, blk, s = dc.gen_length, dc.block_length, dc.steps_per_block
    nb = g // blk
    length = lp + g
    mask_id = cfg.mask_token_id
    static = dc.rule in ("low_confidence", "random")
    max_steps = s if static else blk
    t_max = nb * max_steps
    conf_dt = dc.confidence_dtype
    x = jnp.concatenate([prompts.astype(jnp.int32), jnp.full((b, g), mask_id, jnp.int32)], axis=1)
    valid = jnp.concatenate([prompt_valid.astype(bool), jnp.ones((b, g), bool)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    attn = M.padding_mask(valid)  # LLaDA: pad keys hidden, pad queries still attend (spec §2.4)

    def decide(carry, logits, start, remaining, i):
        """Apply the rule to the block at `start` given its logits [B, blk, V]; i: this block's step index."""
        x, step_map, conf_map, n_fwd, commits = carry
        xb = jax.lax.dynamic_slice_in_dim(x, start, blk, axis=1)
        masked = xb == mask_id
        active = jnp.any(masked, axis=1)  # rows that still decode this block
        if cfg.eos_token_id is not None and dc.logits_eos_inf:
            logits = logits.at[..., cfg.eos_token_id].set(-jnp.inf)
        if dc.forbid_mask_token:
            logits = sampling.forbid_token(logits, mask_id)
        t_row = jnp.minimum(n_fwd, t_max - 1)  # per-row step counter indexes replayed noise
        uni = None
        if replay_uniforms is not None:
            uni = jnp.take_along_axis(replay_uniforms, t_row.reshape((b,) + (1,) * (replay_uniforms.ndim - 1)),
                                      axis=1)[:, 0]
        sub = jax.random.fold_in(key, start * max_steps + i)
        if dc.temperature > 0:
            x0 = sampling.gumbel_argmax_llada(logits, dc.temperature, key=None if uni is not None else sub,
                                              uniforms=uni if dc.rule != "random" else None)
        else:
            x0 = sampling.greedy(logits)
        clog = logits
        if dc.confidence_eos_eot_inf:  # quirk Q2: applied after x0; with T > 0 only EoT reaches the confidence
            ids = [dc.eot_token_id] + ([cfg.eos_token_id] if dc.temperature == 0 and cfg.eos_token_id is not None
                                       else [])
            for t in ids:
                clog = clog.at[..., t].set(-jnp.inf)
        n = _schedule(remaining, s, jnp.minimum(i, s - 1))
        if dc.rule == "random":
            sel = rules.commit_random_top_n(masked, n, key=None if uni is not None else sub, uniforms=uni)
            conf = jnp.zeros(masked.shape, jnp.float32)
        else:
            conf = sampling.token_confidence(clog, x0, conf_dt)
            conf = jnp.where(masked, conf, jnp.asarray(-jnp.inf, conf.dtype))
            if dc.rule == "low_confidence":
                sel = rules.commit_top_n(conf, masked, n)
            elif dc.rule == "fast_dllm_threshold":
                sel = rules.commit_fast_dllm_threshold(conf, masked, dc.tau)
            elif dc.rule == "fast_dllm_factor":
                sel = rules.commit_fast_dllm_factor(conf, masked, dc.factor)
            else:
                sel = rules.commit_tau_budget(conf, masked, n, dc.tau, m=dc.budget_m)
        sel = sel & active[:, None]
        x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(sel, x0, xb), start, axis=1)
        sm = jax.lax.dynamic_slice_in_dim(step_map, start, blk, axis=1)
        step_map = jax.lax.dynamic_update_slice_in_dim(step_map, jnp.where(sel, (n_fwd + 1)[:, None], sm), start, 1)
        cm = jax.lax.dynamic_slice_in_dim(conf_map, start, blk, axis=1)
        c32 = jnp.where(masked, conf, 0).astype(jnp.float32)
        conf_map = jax.lax.dynamic_update_slice_in_dim(conf_map, jnp.where(sel, c32, cm), start, 1)
        commits = commits.at[jnp.arange(b), t_row].add(jnp.where(active, jnp.sum(sel, axis=1, dtype=jnp.int32), 0))
        return x, step_map, conf_map, n_fwd + active, commits

    def full_logits(x, start, cache=None):
        """Whole-canvas forward (optionally filling a fresh cache); logits only for the block."""
        if dc.cfg_scale > 0:  # LLaDA's CFG: one forward over [x ; x with the whole prompt area (pads too) masked]
            un_x = x.at[:, :lp].set(mask_id)
            h, _ = M.hidden_states(cfg, params, jnp.concatenate([x, un_x]), jnp.concatenate([pos, pos]),
                                   jnp.concatenate([attn, attn]))
            lg = M.lm_head(cfg, params, jax.lax.dynamic_slice_in_dim(h, start, blk, axis=1))
            cond, uncond = lg[:b], lg[b:]
            w = jnp.asarray(dc.cfg_scale + 1.0, lg.dtype)  # model-dtype arithmetic, as the reference
            return uncond + w * (cond - uncond), None
        h, cache = M.hidden_states(cfg, params, x, pos, attn, cache, None if cache is None else 0)
        return M.lm_head(cfg, params, jax.lax.dynamic_slice_in_dim(h, start, blk, axis=1)), cache

    def cached_logits(x, start, cache):
        """Fast-dLLM cached step. prefix: feed x[start:] (static start) against the prefix cache; dual: feed only
        the block, overwriting its slots, against the cache of the whole canvas (suffix stale since block start)."""
        if dc.cache == "prefix":
            h, _ = M.hidden_states(cfg, params, x[:, start:], pos[:, start:], attn[:, start:], cache, start)
            return M.lm_head(cfg, params, h[:, :blk]), cache
        xb = jax.lax.dynamic_slice_in_dim(x, start, blk, axis=1)
        pb = jax.lax.dynamic_slice_in_dim(pos, start, blk, axis=1)
        mb = jax.lax.dynamic_slice_in_dim(attn, start, blk, axis=1)
        h, cache = M.hidden_states(cfg, params, xb, pb, mb, cache, start)
        return M.lm_head(cfg, params, h), cache

    def block(k, carry):
        start = lp + k * blk  # a Python int for the prefix cache (suffix length must be static), traced otherwise
        remaining = jnp.sum(jax.lax.dynamic_slice_in_dim(carry[0], start, blk, axis=1) == mask_id, axis=1,
                            dtype=jnp.int32)
        # step 0: a full forward (it also refreshes the Fast-dLLM cache); every block starts fully masked
        cache = None if dc.cache == "none" else M.init_cache(cfg, b, length, per_layer=M.is_unstacked(params))
        logits, cache = full_logits(carry[0], start, cache)
        if dc.cache == "prefix":
            cache = {**cache, "valid": cache["valid"] & (jnp.arange(length) < start)[None]}
        carry = decide(carry, logits, start, remaining, 0)

        def cond(c):
            i, inner, _ = c
            has = jnp.any(jax.lax.dynamic_slice_in_dim(inner[0], start, blk, axis=1) == mask_id)
            return has & (i < max_steps)

        def body(c):
            i, inner, cache = c
            if dc.cache == "none":
                logits, _ = full_logits(inner[0], start)
            else:
                logits, cache = cached_logits(inner[0], start, cache)
            return i + 1, decide(inner, logits, start, remaining, i), cache

        return jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), carry, cache))[1]

    carry = (x, jnp.zeros((b, length), jnp.int32), jnp.zeros((b, length), jnp.float32), jnp.zeros(b, jnp.int32),
             jnp.zeros((b, t_max), jnp.int32))
    if dc.cache == "prefix":  # static block starts: one traced copy of the block loop per block
        for k in range(nb):
            carry = block(k, carry)
    else:
        carry = jax.lax.fori_loop(0, nb, block, carry)
    x, step_map, conf_map, n_fwd, commits = carry
    comp_steps = step_map[:, lp:]
    keep = jnp.ones((b, g), bool)
    dec = comp_steps > 0
    return dict(tokens=x[:, lp:], step_map=comp_steps, conf=conf_map[:, lp:], commits_per_step=commits,
                n_forward=n_fwd, tpf=stats.tokens_per_forward(comp_steps, keep),
                ewc=jnp.sum(jnp.where(dec, 1.0 - conf_map[:, lp:], 0.0), axis=1), canvas=x)
