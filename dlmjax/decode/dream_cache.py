"""Fast-dLLM v1 Dream "block + cache" decoding (models_decoders.md §6.4.3, second bullet), the whole generation in one
jit. Reference: NVlabs/Fast-dLLM @ 24cc59e `dream/model/generation_utils_block.py` (`_sample`, use_cache=True).

The canvas [left-padded prompt | G masks] is decoded in blocks of `block_length`, left to right. Per block:
  1. a full forward over the canvas refreshes a KV cache of every position; its shifted logits (§1.6) give a
     candidate at the block's first slot, which is committed unconditionally (`x[:, start] := x0[:, start]`);
  2. cached forwards until the block has no mask (the test sits at the bottom of the reference's loop, so at least
     one cached forward runs per block): `prefix` feeds x[start:] (the block and everything after it) against the
     K/V of [0, start) from step 1; `dual` feeds only the block, overwriting its slots, against the K/V of the whole
     canvas from step 1 (the suffix is stale). The shift is re-applied inside the window: window position 0 keeps
     its own logits (harmless: that slot was committed in step 1). Step rules on the block's masked slots:
       * 'confidence_threshold': p(x0) in the confidence dtype; the best slot always, every other one with c ≥ τ
         (τ rounded to the confidence dtype, N5) — the §6.4.1 threshold rule;
       * 'entropy' (the reference's branch for every other alg): negative-entropy top-k with
         k = int(n·(1 - t[i+1]/t[i])) in float32 (int(n) at i = S-1), t = linspace(1, eps, S+1),
         S = steps / num_blocks, i = 1, 2, ...; at i = S the loop breaks after its forward (S = 1: the block keeps
         its masks), or alg_temp > 0: k slots drawn from softmax(C / alg_temp) (Gumbel-top-k).
Positions are Dream's `tok_idx` (= the reference's arange for an unpadded row). The reference is batch 1; here every
row of a left-padded batch decodes exactly as it would alone: own mask counts, own stopping (a row whose block is
done stops changing and its forwards are not counted; the loop runs while any row still decodes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax import model as M
from dlmjax.config import ModelConfig
from dlmjax.decode import dream as D
from dlmjax.decode import rules, stats

RULES = ("confidence_threshold", "entropy")
CACHES = ("prefix", "dual")


@dataclasses.dataclass(frozen=True)
class DreamCacheDecodeConfig:
    """Static settings of Fast-dLLM v1 Dream block + cache decoding. Defaults: F1 `dream/eval.py` (threshold 0.9,
    block 32, alg confidence_threshold, prefix cache)."""

    max_new_tokens: int = 256  # G; a multiple of block_length (reference assertion)
    block_length: int = 32
    steps: int = 256  # total; S = steps / num_blocks (asserted integral); used by the 'entropy' schedule only
    eps: float = 1e-3
    rule: str = "confidence_threshold"  # the reference's `alg`: confidence_threshold, else the entropy schedule
    cache: str = "prefix"  # prefix | dual (the reference's `dual_cache` flag)
    tau: float = 0.9  # confidence_threshold
    alg_temp: float | None = None  # entropy rule: > 0 draws the k slots from softmax(C / alg_temp)
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    conf_dtype: str | None = None  # None = the logits' dtype (bf16 in the reference)
    forbid_mask_token: bool = False  # the reference may sample the mask token; True forbids it
    # cached forwards per block (confidence_threshold); None = block_length, which cannot bind unless the mask token
    # is committed (every cached forward commits >= 1 slot of the <= block_length masks)
    max_steps_per_block: int | None = None

    def __post_init__(self):
        def bad(why):
            raise ValueError(f"DreamCacheDecodeConfig: {why}")

        if self.rule not in RULES:
            bad(f"rule={self.rule!r} is not one of {RULES} (the reference's non-threshold branch always ranks by "
                "negative entropy, whatever its alg)")
        if self.cache not in CACHES:
            bad(f"cache={self.cache!r} is not one of {CACHES}")
        if min(self.max_new_tokens, self.block_length, self.steps) < 1:
            bad("max_new_tokens, block_length and steps must be positive")
        if self.max_new_tokens % self.block_length:
            bad(f"max_new_tokens={self.max_new_tokens} is not a multiple of block_length={self.block_length}")
        if self.steps % self.num_blocks:
            bad(f"steps={self.steps} is not a multiple of the number of blocks {self.num_blocks}")
        D.check_sampling_fields(self, bad)
        if self.uses_alg_temp and self.rule != "entropy":
            bad("alg_temp > 0 applies to rule='entropy' only")
        if self.max_steps_per_block is not None:
            if self.rule != "confidence_threshold":
                bad("max_steps_per_block applies to rule='confidence_threshold' only")
            if self.max_steps_per_block < 1:
                bad(f"max_steps_per_block={self.max_steps_per_block} must be >= 1")

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def uses_alg_temp(self) -> bool:
        return self.alg_temp is not None and self.alg_temp != 0

    @property
    def alg(self) -> str:
        """The confidence `dream.candidates` computes: negative entropy, or p(x0) for the threshold rule."""
        return "entropy" if self.rule == "entropy" else "maskgit_plus"

    @property
    def cached_per_block(self) -> int:
        """Most cached forwards per block: the entropy loop runs i = 1..S (i = S only forwards and breaks)."""
        if self.rule == "entropy":
            return self.steps_per_block
        return self.block_length if self.max_steps_per_block is None else self.max_steps_per_block

    @property
    def n_iterations(self) -> int:
        """Most forwards of a row (the width of the per-step outputs): per block one full + the cached ones."""
        return self.num_blocks * (1 + self.cached_per_block)


def entropy_counts(dc: DreamCacheDecodeConfig) -> np.ndarray:
    """k of the entropy rule per (step i, masks n in the block): int(f32(n) · f32(1 - t[i+1]/t[i])) for i < S-1,
    n at i = S-1 (torch float32 0-d tensors; batch 1 so n̄ = n). Row 0 is unused (the loop starts at i = 1).
    [S, block_length + 1] int32."""
    frac = D.transfer_fractions(dc.steps_per_block, dc.eps)  # frac[S-1] = 1
    n = np.arange(dc.block_length + 1, dtype=np.float32)
    return np.floor((n[None, :] * frac[:, None]).astype(np.float32)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def block_generate_cached(cfg: ModelConfig, dc: DreamCacheDecodeConfig, params, prompts, prompt_valid, key,
                          replay=None):
    """Decode B left-padded prompts with Fast-dLLM v1's Dream block + cache loop.

    prompts: [B, P] int32; prompt_valid: [B, P] bool or [B] int32 lengths (as `dream.diffusion_generate`); key: PRNG
    key. replay: optional dict of the reference's draws, each [B, T, G] indexed by the row's 0-based forward (full
    and cached forwards counted alike, T = dc.n_iterations) and completion slot: 'tokens' (int32, sampled candidates
    when temperature > 0) and 'gumbel' (float32, alg_temp > 0).
    Returns the dict of `dream.diffusion_generate`: tokens [B, G], step_map [B, G] (the row's 1-based forward that
    unmasked the slot, 0 = still masked), conf [B, G] (p of that token), commits_per_step / ewc_per_step [B, T],
    tpf [B] (tokens / distinct committing forwards), ewc [B], n_forward [B] (full + cached forwards the row ran),
    canvas [B, P+G]; plus n_full [B] (the block-start full forwards, = num_blocks).
    """
    b, p = prompts.shape
    g, blk, nb, s_blk, n_it = dc.max_new_tokens, dc.block_length, dc.num_blocks, dc.steps_per_block, dc.n_iterations
    cap = dc.cached_per_block
    length = p + g
    mask_id, dt, forbid, pos, attn, x = D.canvas(cfg, dc, prompts, prompt_valid, "block_generate_cached")
    replay = replay or {}
    rows = jnp.arange(b)
    ktab = jnp.asarray(entropy_counts(dc))                                # [S, blk + 1]

    def window_logits(h):
        """Shift inside the window [B, W, D] -> logits of its first blk positions [B, blk, V]; position 0 keeps
        its own."""
        if cfg.logit_shift:
            h = jnp.concatenate([h[:, :1], h[:, :blk - 1]], axis=1)
        return M.lm_head(cfg, params, h[:, :blk])

    def replayed(name, c, col, width):
        """[B, width] of a replayed draw at each row's current forward (None when not replayed)."""
        if name not in replay:
            return None
        t = jnp.clip(c["n_fwd"] - 1, 0, n_it - 1)                         # the forward just counted
        r = jnp.take_along_axis(replay[name], t[:, None, None], axis=1)[:, 0]   # [B, G]
        return jax.lax.dynamic_slice_in_dim(r, col, width, axis=1)

    def propose(logits, c, col, salt):
        """Candidates of `dream.candidates` for the window's slots: x0, p(x0), confidence [B, W]; the key / draws."""
        k_tok, k_gum = jax.random.split(jax.random.fold_in(key, salt))
        w = logits.shape[1]
        tok = replayed("tokens", c, col, w)
        x0, pr, conf = D.candidates(dc, logits, dt, forbid=forbid, key=None if tok is not None else k_tok,
                                    tokens=tok)
        return x0, pr, conf, k_gum, replayed("gumbel", c, col, w)

    def write(c, start, commit, masked, x0, pr, active):
        """Commit [B, W] slots of the window at canvas column `start`; statistics at each row's current forward."""
        col = start - p
        w = commit.shape[1]
        xb = jax.lax.dynamic_slice_in_dim(c["x"], start, w, axis=1)
        unmasked = commit & masked & (x0 != mask_id)                      # a committed mask token stays masked
        p32 = pr.astype(jnp.float32)
        sm = jax.lax.dynamic_slice_in_dim(c["step_map"], col, w, axis=1)
        cm = jax.lax.dynamic_slice_in_dim(c["conf_map"], col, w, axis=1)
        t = jnp.clip(c["n_fwd"] - 1, 0, n_it - 1)
        n_new = jnp.where(active, jnp.sum(unmasked, axis=1, dtype=jnp.int32), 0)
        e_new = jnp.where(active, jnp.sum(jnp.where(unmasked, 1.0 - p32, 0.0), axis=1), 0.0)
        upd = lambda a, v, i: jax.lax.dynamic_update_slice_in_dim(a, v, i, axis=1)  # noqa: E731
        return dict(c, x=upd(c["x"], jnp.where(commit, x0, xb), start),
                    step_map=upd(c["step_map"], jnp.where(unmasked, c["n_fwd"][:, None], sm), col),
                    conf_map=upd(c["conf_map"], jnp.where(unmasked, p32, cm), col),
                    commits=c["commits"].at[rows, t].add(n_new), ewc=c["ewc"].at[rows, t].add(e_new))

    def block(k, c):
        start = p + k * blk  # a Python int for the prefix cache (static window), traced under the dual fori_loop
        col = start - p
        salt0 = k * (cap + 1)
        # 1. full forward: a fresh cache of the whole canvas; forced commit of the block's first slot
        cache = M.init_cache(cfg, b, length, per_layer=M.is_unstacked(params))
        h, cache = M.hidden_states(cfg, params, c["x"], pos, attn, cache, 0)
        src = start - 1 if cfg.logit_shift else start
        logits = M.lm_head(cfg, params, jax.lax.dynamic_slice_in_dim(h, src, 1, axis=1))   # [B, 1, V]
        c = dict(c, n_fwd=c["n_fwd"] + 1, n_full=c["n_full"] + 1)
        x0, pr, _, _, _ = propose(logits, c, col, salt0)
        masked = jax.lax.dynamic_slice_in_dim(c["x"], start, 1, axis=1) == mask_id
        everyone = jnp.ones((b,), bool)
        c = write(c, start, jnp.ones((b, 1), bool), masked, x0, pr, everyone)
        if dc.cache == "prefix":
            cache = {**cache, "valid": cache["valid"] & (jnp.arange(length) < start)[None]}

        def cached_forward(c, cache):
            if dc.cache == "prefix":  # the block and everything after it, against the prefix
                hw, _ = M.hidden_states(cfg, params, c["x"][:, start:], pos[:, start:], attn[:, start:], cache,
                                        start)
                return window_logits(hw), cache
            sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, blk, axis=1)  # noqa: E731
            hw, cache = M.hidden_states(cfg, params, sl(c["x"]), sl(pos), sl(attn), cache, start)
            return window_logits(hw), cache

        def active_rows(j, c):
            """Rows that run iteration j: the first always (do-while), later ones while the block has masks."""
            has = jnp.any(jax.lax.dynamic_slice_in_dim(c["x"], start, blk, axis=1) == mask_id, axis=1)
            return (j == 1) | has

        def cond(s):
            j, c, _ = s
            return (j <= cap) & jnp.any(active_rows(j, c))

        def body(s):
            j, c, cache = s
            active = active_rows(j, c)                                    # [B]
            masked = jax.lax.dynamic_slice_in_dim(c["x"], start, blk, axis=1) == mask_id   # [B, blk]
            logits, cache = cached_forward(c, cache)
            c = dict(c, n_fwd=c["n_fwd"] + active.astype(jnp.int32))
            x0, pr, conf, k_gum, gum = propose(logits, c, col, salt0 + j)
            conf = jnp.where(masked, conf, jnp.asarray(-jnp.inf, conf.dtype))
            n = jnp.sum(masked, axis=1, dtype=jnp.int32)
            if dc.rule == "confidence_threshold":
                commit, _ = D.select_threshold(conf, masked, n, dc.tau)  # K = the row's masks in the block
            else:  # i = j; at i = S the reference breaks right after the forward
                kk = ktab[jnp.minimum(j, s_blk - 1)][n]
                commit = rules.commit_dream_topk(conf, masked, kk, alg_temp=dc.alg_temp if dc.uses_alg_temp else None,
                                                 key=None if gum is not None else k_gum, gumbel=gum)
                commit &= j < s_blk
            commit &= active[:, None]
            return j + 1, write(c, start, commit, masked, x0, pr, active), cache

        return jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), c, cache))[1]

    carry = dict(x=x, step_map=jnp.zeros((b, g), jnp.int32), conf_map=jnp.zeros((b, g), jnp.float32),
                 commits=jnp.zeros((b, n_it), jnp.int32), ewc=jnp.zeros((b, n_it), jnp.float32),
                 n_fwd=jnp.zeros((b,), jnp.int32), n_full=jnp.zeros((b,), jnp.int32))
    if dc.cache == "prefix":  # static window length per block: one traced copy of the block loop per block
        for k in range(nb):
            carry = block(k, carry)
    else:
        carry = jax.lax.fori_loop(0, nb, block, carry)
    c = carry
    keep = jnp.ones((b, g), bool)
    decoded = c["step_map"] > 0
    return dict(tokens=c["x"][:, p:], step_map=c["step_map"], conf=c["conf_map"], commits_per_step=c["commits"],
                ewc_per_step=c["ewc"], tpf=stats.tokens_per_forward(c["step_map"], keep),
                ewc=jnp.sum(jnp.where(decoded, 1.0 - c["conf_map"], 0.0), axis=1), n_forward=c["n_fwd"],
                n_full=c["n_full"], canvas=c["x"])
