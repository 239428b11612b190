"""SDAR / TraDo block decoding with the KV cache, the whole generation in one jit (slimrl_tracerl.md §0.2).

Blocks of K tokens are aligned to absolute positions 0, K, 2K, ... of each row. Prefill writes the K/V of every full
prompt block; the prompt tail opens the first decoding block. Each loop iteration runs one forward per row on that
row's current block against the cache:
  * a block that still has masks gets a denoising step (read-only: its K/V are not marked valid), the sampler draws
    a candidate per slot and the commit rule picks which to keep;
  * a finished block (no mask left, or S steps used: a sampled mask token stays in place, as in the reference)
    gets the extra "saving" forward that makes its K/V valid, then the row stops if the block holds
    a stop id or reached max_new_tokens, else moves to the next block.
Rows advance independently; a finished row stops changing and stops counting; the loop ends when every row is done.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.decode import rules, sampling, stats

CONF_DTYPES = ("float32", "bfloat16", "float16", "float64")
RULES = ("static", "dynamic", "tau_budget", "sequential", "contiguous_dynamic", "nlc_bounded_dynamic", "gc_dynamic",
         "entropy_bounded")


@dataclasses.dataclass(frozen=True)
class BlockDecodeConfig:
    """Static settings of SDAR block decoding (defaults: the SLIM-RL / TraceRL evaluation setting with K=4)."""

    block_size: int = 4  # K; blocks aligned to absolute multiples of K
    steps: int = 4  # S: denoising steps per block; static floor sched[i] = K // S + (i < K % S)
    max_new_tokens: int = 128
    rule: str = "dynamic"  # static | dynamic (TraceRL, c > tau) | tau_budget (SLIM-RL) | sequential | the other
    #                        SLIM-RL engine rules: contiguous_dynamic, nlc_bounded_dynamic, gc_dynamic, entropy_bounded
    tau: float = 0.9
    budget_m: float = 1.0  # tau_budget: b = m (1 - tau); m <= 0 means m = the static count
    nlc_budget: float = 1.0  # nlc_bounded_dynamic: budget of cumulative -log p
    eb_threshold: float = 0.35  # entropy_bounded: budget of cumulative entropy (SDAR generate.py CLI default)
    temperature: float = 1.0  # 0 = greedy (as every LLM tool reads T = 0); < 0 is an error
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    greedy: bool = False  # argmax candidates, confidence = untempered softmax prob (spec A6); set by temperature 0
    conf_dtype: str = "float32"  # dtype of probabilities and threshold comparisons (jetengine: float32; N5)
    stop_ids: tuple = ()  # a block containing one of these ends the row (kept, then truncated after it)
    forbid_mask_token: bool = False  # the reference may sample the mask token itself; True forbids it

    def __post_init__(self):
        def bad(why):
            raise ValueError(f"BlockDecodeConfig.{why}")

        if self.rule not in RULES:
            bad(f"rule: {self.rule!r} is not one of {RULES}")
        if not (0 < self.steps <= self.block_size):
            bad(f"steps: need 0 < steps <= block_size, got {self.steps}")
        if self.max_new_tokens <= 0:
            bad("max_new_tokens must be positive")
        rules.check_tau(self.tau, bad)
        if not self.temperature >= 0:  # also rejects NaN
            bad(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k < 0:
            bad(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.conf_dtype not in CONF_DTYPES:
            bad(f"conf_dtype={self.conf_dtype!r} is not one of {CONF_DTYPES}")
        if self.temperature == 0 and not self.greedy:
            object.__setattr__(self, "greedy", True)  # T = 0 means greedy: argmax candidates

    def schedule(self) -> np.ndarray:
        k, s = self.block_size, self.steps
        return np.array([k // s + (i < k % s) for i in range(s)], np.int32)


def _commit(dc: BlockDecodeConfig, conf, masked, n, steps_left, entropy):
    if dc.rule == "static":
        return rules.commit_top_n(conf, masked, n)
    if dc.rule == "dynamic":
        return rules.commit_dynamic_threshold(conf, masked, n, dc.tau)
    if dc.rule == "tau_budget":
        return rules.commit_tau_budget(conf, masked, n, dc.tau, m=dc.budget_m)
    if dc.rule == "contiguous_dynamic":
        return rules.commit_contiguous_dynamic(conf, masked, n, dc.tau)
    if dc.rule == "nlc_bounded_dynamic":
        return rules.commit_nlc_bounded_dynamic(conf, masked, n, dc.nlc_budget)
    if dc.rule == "gc_dynamic":
        return rules.commit_gc_dynamic(conf, masked, steps_left, dc.tau)
    if dc.rule == "entropy_bounded":
        return rules.commit_entropy_bounded(entropy, masked, dc.eb_threshold)
    return rules.commit_sequential(masked, n)


def _entropy(dc: BlockDecodeConfig, logits, conf_dt, forbid):
    """Entropy of each slot's filtered distribution (the engine's clamped entropy), for entropy_bounded only."""
    x = sampling.forbid_token(logits.astype(conf_dt), forbid)
    if not dc.greedy:
        x = sampling.filter_logits(x, temperature=dc.temperature, top_k=dc.top_k, top_p=dc.top_p, top_p_first=False,
                                   prob_dtype=conf_dt)
    return sampling.clamped_entropy(sampling.probs(x, conf_dt))


@functools.partial(jax.jit, static_argnums=(0, 1))
def block_generate(cfg: ModelConfig, dc: BlockDecodeConfig, params, prompts, prompt_lens, key, replay_tokens=None):
    """Decode B prompts of different lengths together.

    prompts: [B, P] int32, left-aligned (row b's prompt is prompts[b, :prompt_lens[b]]); key: PRNG key.
    replay_tokens: optional [B, T, K] int32 candidate tokens per row and denoising step (replaces sampling; used to
    replay a reference's random draws in tests).
    Returns a dict: tokens [B, G] (pad after the end), lengths [B], step_map [B, G] (1-based denoising step of each
    token's commit), conf [B, G] (its confidence), commits_per_step / ewc_per_step [B, T], n_denoise / n_save [B],
    tpf [B], ewc [B] (Σ 1-p over kept tokens).
    """
    k, s, g = dc.block_size, dc.steps, dc.max_new_tokens
    b, p = prompts.shape
    mask_id = cfg.mask_token_id
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else mask_id
    lmax = -(-(p + g) // k) * k
    n_blocks = lmax // k
    t_max = n_blocks * s
    sched = jnp.asarray(dc.schedule())
    conf_dt = jnp.dtype(dc.conf_dtype)
    plen = prompt_lens.astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(lmax, dtype=jnp.int32), (b, lmax))
    x = jnp.full((b, lmax), mask_id, jnp.int32)
    x = x.at[:, :p].set(jnp.where(jnp.arange(p) < plen[:, None], prompts.astype(jnp.int32), mask_id))

    cache = M.init_cache(cfg, b, lmax, per_layer=M.is_unstacked(params))
    pre = (plen // k) * k  # [B] full prompt blocks
    pre_max = (p // k) * k
    if pre_max > 0:
        pos = slots[:, :pre_max]
        _, cache = M.forward(cfg, params, x[:, :pre_max], pos, M.block_causal_mask(pos, slots, k), cache, 0)
        cache = {**cache, "valid": slots < pre[:, None]}

    rows = jnp.arange(b)[:, None]
    offs = jnp.arange(k, dtype=jnp.int32)
    carry = dict(x=x, cache=cache, start=pre, step=jnp.zeros(b, jnp.int32), done=jnp.zeros(b, bool),
                 step_map=jnp.zeros((b, lmax), jnp.int32), conf_map=jnp.zeros((b, lmax), jnp.float32),
                 n_denoise=jnp.zeros(b, jnp.int32), n_save=jnp.zeros(b, jnp.int32),
                 commits=jnp.zeros((b, t_max), jnp.int32), ewc_steps=jnp.zeros((b, t_max), jnp.float32),
                 it=jnp.zeros((), jnp.int32))
    stop_ids = jnp.asarray(dc.stop_ids if dc.stop_ids else (-1,), jnp.int32)
    max_iters = n_blocks * (s + 1) + 1

    def cond(c):
        return jnp.any(~c["done"]) & (c["it"] < max_iters)

    def body(c):
        idx = c["start"][:, None] + offs  # [B, K] absolute positions of each row's block
        xb = jnp.take_along_axis(c["x"], idx, axis=1)
        masked = xb == mask_id
        has_mask = jnp.any(masked, axis=1)
        den = ~c["done"] & has_mask & (c["step"] < s)  # a block ends when no mask remains or S steps were used
        sav = ~c["done"] & ~den
        logits, new_cache = M.forward(cfg, params, xb, idx, M.block_causal_mask(idx, slots, k), c["cache"],
                                      c["start"])
        forbid = mask_id if dc.forbid_mask_token else None
        if replay_tokens is not None:
            tok = jnp.take_along_axis(replay_tokens, jnp.minimum(c["n_denoise"], t_max - 1)[:, None, None], axis=1)
            x0, pr = sampling.sample_sdar(logits, temperature=dc.temperature, top_k=dc.top_k, top_p=dc.top_p,
                                          dtype=conf_dt, tokens=tok[:, 0], forbid=forbid)
        else:
            x0, pr = sampling.sample_sdar(logits, temperature=dc.temperature, top_k=dc.top_k, top_p=dc.top_p,
                                          dtype=conf_dt, key=jax.random.fold_in(key, c["it"]),
                                          greedy_decode=dc.greedy, forbid=forbid)
        conf = jnp.where(masked, pr, jnp.asarray(-jnp.inf, conf_dt))
        n = sched[jnp.minimum(c["step"], s - 1)]
        ent = _entropy(dc, logits, conf_dt, forbid) if dc.rule == "entropy_bounded" else None
        commit = _commit(dc, conf, masked, n, s - c["step"], ent) & den[:, None]
        x = c["x"].at[rows, idx].set(jnp.where(commit, x0, xb))
        gstep = (c["n_denoise"] + 1)[:, None]
        step_map = c["step_map"].at[rows, idx].set(jnp.where(commit, gstep, c["step_map"][rows, idx]))
        p32 = pr.astype(jnp.float32)
        conf_map = c["conf_map"].at[rows, idx].set(jnp.where(commit, p32, c["conf_map"][rows, idx]))
        t_idx = jnp.minimum(c["n_denoise"], t_max - 1)[:, None]
        n_com = jnp.sum(commit, axis=1, dtype=jnp.int32)[:, None]
        ewc = jnp.sum(jnp.where(commit, 1.0 - p32, 0.0), axis=1)[:, None]
        commits = jnp.where(den[:, None], c["commits"].at[rows, t_idx].set(n_com), c["commits"])
        ewc_steps = jnp.where(den[:, None], c["ewc_steps"].at[rows, t_idx].set(ewc), c["ewc_steps"])
        # cache: K/V slots are always overwritten (invisible until valid); only saving rows make them valid
        cache = {"k": new_cache["k"], "v": new_cache["v"],
                 "valid": jnp.where(sav[:, None], new_cache["valid"], c["cache"]["valid"])}
        # a saved block ends the row if it holds a stop id in the completion, or the completion is long enough
        blk_end = c["start"] + k
        in_comp = (idx >= plen[:, None]) & (idx < (plen + g)[:, None])
        hit_stop = jnp.any(in_comp & jnp.isin(xb, stop_ids), axis=1)
        finished = sav & (hit_stop | (blk_end >= plen + g))
        return dict(x=x, cache=cache, start=jnp.where(sav & ~finished, blk_end, c["start"]),
                    step=jnp.where(den, c["step"] + 1, jnp.where(sav, 0, c["step"])), done=c["done"] | finished,
                    step_map=step_map, conf_map=conf_map, n_denoise=c["n_denoise"] + den,
                    n_save=c["n_save"] + sav, commits=commits, ewc_steps=ewc_steps, it=c["it"] + 1)

    c = jax.lax.while_loop(cond, body, carry)
    cidx = plen[:, None] + jnp.arange(g, dtype=jnp.int32)  # [B, G] completion positions
    comp = jnp.take_along_axis(c["x"], cidx, axis=1)
    is_stop = jnp.isin(comp, stop_ids)
    first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, g)
    keep = jnp.arange(g)[None] < first_stop[:, None]
    step_map = jnp.where(keep, jnp.take_along_axis(c["step_map"], cidx, axis=1), 0)
    conf = jnp.where(keep, jnp.take_along_axis(c["conf_map"], cidx, axis=1), 0.0)
    return dict(tokens=jnp.where(keep, comp, pad_id), lengths=first_stop.astype(jnp.int32), step_map=step_map,
                conf=conf, commits_per_step=c["commits"], ewc_per_step=c["ewc_steps"], n_denoise=c["n_denoise"],
                n_save=c["n_save"], tpf=stats.tokens_per_forward(step_map, keep),
                ewc=jnp.sum(jnp.where(keep & (step_map > 0), 1.0 - conf, 0.0), axis=1), canvas=c["x"],
                iterations=c["it"])
