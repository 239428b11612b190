"""Per-block commit rules of the dLLM decoders, as pure, jit-compatible JAX functions.

Every rule maps one block's confidences `conf [B, K]` (any float dtype), the still-masked slots `masked [B, K]` (bool)
and per-row integer counts (`[B]` int32 or a scalar) to a boolean commit mask `[B, K]`. Specs:
`models_decoders.md` §6 (LLaDA, Dream, SDAR, Fast-dLLM v1), `slimrl_tracerl.md` §0.3 (jetengine rules incl.
τ-budget), and the SLIM-RL engine's `scheduler.py` (sequential, contiguous/nlc/gc dynamic, entropy_bounded).

Conventions (see BUILD_NOTES.md, "Rule and sampler choices"):
* "top-k with a per-row k" is a rank mask: masked slots ranked first, by descending confidence, ties to the lower
  index (N7, §8.3); `sel = rank < k`. Non-masked slots rank after all masked ones, in index order.
* Comparisons with thresholds happen in `conf.dtype` (N5): a Python-float τ is rounded to that dtype first.
  Sums (τ-budget, nlc, entropy) accumulate in float32 (float64 for float64 inputs) and are rounded to `conf.dtype`.
* `masked_only=True` (default) never commits a non-masked slot. `masked_only=False` reproduces quirk Q3 of the
  static / dynamic / sequential rules: asked for more slots than remain masked, the reference commits non-masked slots
  too (in the reference the choice among those `-inf` ties is undefined; here it is the lowest index).
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "descending_rank", "commit_top_n", "commit_dynamic_threshold", "commit_tau_budget", "commit_fast_dllm_threshold",
    "commit_fast_dllm_factor", "commit_sequential", "commit_contiguous_dynamic", "commit_nlc_bounded_dynamic",
    "commit_gc_dynamic", "commit_entropy_bounded", "commit_random_top_n", "commit_dream_origin", "commit_dream_topk",
    "threshold_in", "round_to",
]


# ----------------------------------------------------------------------------------------------------------------------
# helpers

def _acc(dtype) -> jnp.dtype:
    """Accumulation dtype: float64 stays float64, everything else sums in float32 (torch opmath for half types)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def round_to(x: jax.Array, dtype) -> jax.Array:
    """x rounded to `dtype` (one torch op on a half-type tensor), returned in `dtype`.

    Narrowing rounds with `reduce_precision` in the wide dtype (fp16 subnormals by an exact scaled round) before the
    cast, so the value is already representable: XLA CPU's excess-precision rewrites (they drop a bf16 convert pair
    inside fused reductions even under an optimization barrier) cannot skip the rounding (N10)."""
    dt = jnp.dtype(dtype)
    if dt.itemsize >= jnp.dtype(x.dtype).itemsize:
        return x.astype(dt)
    info = jnp.finfo(dt)
    y = lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    if info.nexp < jnp.finfo(x.dtype).nexp:                              # target subnormals are normal here
        q = float(info.smallest_subnormal)
        y = jnp.where(jnp.abs(x) < float(info.smallest_normal), jnp.round(x / q) * q, y)
    return y.astype(dt)


def _col(x, batch: int, dtype=jnp.int32) -> jax.Array:
    """Scalar or per-row value -> [B, 1] column."""
    x = jnp.asarray(x).astype(dtype)
    return jnp.broadcast_to(x.reshape(-1, 1) if x.ndim else x, (batch, 1))


def threshold_in(tau, dtype, batch: int | None = None) -> jax.Array:
    """τ rounded to the comparison dtype, as torch does for `tensor > python_float` (N5).

    A Python float goes straight to `dtype` (bf16(0.9) = 0.8984375); an array is cast. Returns a scalar, or `[B, 1]`
    when `tau` is per-row and `batch` is given.
    """
    t = jnp.asarray(tau, dtype=dtype) if isinstance(tau, (int, float)) else jnp.asarray(tau).astype(dtype)
    if t.ndim and batch is not None:
        t = jnp.broadcast_to(t.reshape(-1, 1), (batch, 1))
    return t


def _sort_rows(key: jax.Array, masked: jax.Array, descending: bool):
    """Stable per-row order: masked slots first, then by `key` (descending or ascending), ties to the lower index.

    Returns `order [B, K]` (slot index at each sorted position) and `rank [B, K]` (sorted position of each slot).
    """
    b, k = key.shape
    iota = lax.broadcasted_iota(jnp.int32, (b, k), 1)
    group = (~masked).astype(jnp.int32)                                   # 0 = masked (first), 1 = not masked
    sort_key = jnp.where(masked, -key if descending else key, jnp.zeros_like(key))
    _, _, order = lax.sort((group, sort_key, iota), dimension=1, is_stable=True, num_keys=2)
    _, rank = lax.sort((order, iota), dimension=1, is_stable=True, num_keys=1)
    return order, rank


def descending_rank(conf: jax.Array, masked: jax.Array) -> jax.Array:
    """Rank of each slot among the masked ones by descending confidence (ties: lower index); non-masked rank last."""
    return _sort_rows(conf, masked, descending=True)[1]


def _n_masked(masked: jax.Array) -> jax.Array:
    return jnp.sum(masked, axis=1, keepdims=True, dtype=jnp.int32)       # [B, 1]


def _first_masked(masked: jax.Array):
    """Index of the first masked slot per row `[B, 1]` and whether the row has one `[B, 1]`."""
    return jnp.argmax(masked, axis=1, keepdims=True).astype(jnp.int32), jnp.any(masked, axis=1, keepdims=True)


def _sorted_cumsum(values: jax.Array, order: jax.Array, valid_sorted: jax.Array) -> jax.Array:
    """Cumulative sum of `values` taken in `order`, over the sorted positions marked valid, rounded to values' dtype."""
    v = jnp.take_along_axis(values, order, axis=1)
    v = jnp.where(valid_sorted, v, jnp.zeros_like(v)).astype(_acc(values.dtype))
    return round_to(jnp.cumsum(v, axis=1), values.dtype)


def _ulps_up(x: jax.Array, ulps: int) -> jax.Array:
    """x moved `ulps` representable steps towards +inf (x ≥ 0, finite): bit pattern + ulps."""
    if ulps == 0:
        return x
    bits = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(x.dtype).itemsize]
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, bits) + bits(ulps), x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# rules

def commit_top_n(conf, masked, n, *, masked_only: bool = True) -> jax.Array:
    """Top-n by confidence per row: LLaDA low_confidence, SDAR/jetengine low_confidence_static, Fast-dLLM (τ None)."""
    rank = descending_rank(conf, masked)
    sel = rank < _col(n, conf.shape[0])
    return sel & masked if masked_only else sel


def check_tau(tau, bad) -> None:
    """Every threshold rule compares a probability with tau: it must be a number in [0, 1] (NaN would make every
    comparison false and silently fall back to the progress floor). bad(why) raises."""
    if not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:  # NaN fails both comparisons
        bad(f"tau={tau} must lie in [0, 1]")


def commit_dynamic_threshold(conf, masked, n, tau, *, masked_only: bool = True) -> jax.Array:
    """TraceRL/jetengine low_confidence_dynamic: all masked slots with c > τ (strict, in conf's dtype); when fewer
    than n pass, the top-n by confidence (a superset of them)."""
    b = conf.shape[0]
    above = masked & (conf > threshold_in(tau, conf.dtype, b))
    n = _col(n, b)
    top = descending_rank(conf, masked) < n
    sel = jnp.where(jnp.sum(above, axis=1, keepdims=True) < n, above | top, above)
    return sel & masked if masked_only else sel


def _tau_budget(tau, m, n, dtype, b: int, k: int) -> jax.Array:
    """Budget m·(1-τ) per row `[B, 1]` in `dtype`; m falls back to the static count n when m ≤ 0.

    With Python τ and m the product is formed in float64 exactly as the reference's Python code does, then rounded to
    `dtype` (the comparison dtype); with array τ it is formed in the accumulation dtype.
    """
    if isinstance(tau, (int, float)) and isinstance(m, (int, float)):
        if m > 0:
            return jnp.broadcast_to(jnp.asarray(m * (1.0 - tau), dtype=dtype), (b, 1))
        table = jnp.asarray(np.arange(k + 1, dtype=np.float64) * (1.0 - tau), dtype=dtype)    # [K+1]
        return table[jnp.clip(_col(n, b), 0, k)]
    acc = _acc(dtype)
    m_col = _col(m, b, acc)
    m_eff = jnp.where(m_col > 0, m_col, _col(n, b, acc))
    return round_to(m_eff * (1.0 - threshold_in(tau, acc, b)), dtype)


def commit_tau_budget(conf, masked, n, tau, *, m=1.0, budget_ulps: int = 1) -> jax.Array:
    """SLIM-RL τ-budget: candidates c > τ sorted by uncertainty u = 1-c; k_budget = longest prefix with Σu ≤ b,
    b = m·(1-τ) (m ≤ 0 → m = n); commit the top k = min(max(k_budget, n), |M|) masked slots.

    Sums run in float32 (float64 for float64 conf; the SLIM LLaDA port), rounded to conf's dtype (the jetengine and
    Dream port compare float32). A cumulative sum at most `budget_ulps` ulps above the budget counts as within: the
    references' own summation order (torch CPU sequential, CUDA scan) moves such sums by an ulp or two.
    """
    b, k = conf.shape
    dt = conf.dtype
    cand = masked & (conf > threshold_in(tau, dt, b))
    order, rank = _sort_rows(conf, masked, descending=True)
    cand_sorted = jnp.take_along_axis(cand, order, axis=1)                # a prefix: sorted by c, c > τ
    unc = round_to(1.0 - conf.astype(_acc(dt)), dt)                      # torch: 1.0 - sorted_conf, in dt
    cum = _sorted_cumsum(unc, order, cand_sorted)
    limit = _ulps_up(_tau_budget(tau, m, n, dt, b, k), budget_ulps)
    k_budget = jnp.sum(cand_sorted & (cum <= limit), axis=1, keepdims=True, dtype=jnp.int32)
    kk = jnp.minimum(jnp.maximum(k_budget, _col(n, b)), _n_masked(masked))
    return masked & (rank < kk)


def commit_fast_dllm_threshold(conf, masked, tau) -> jax.Array:
    """Fast-dLLM v1 threshold rule (June/August 2025): the most confident masked slot always, plus every masked slot
    with c ≥ τ (compared in conf's dtype: float64 for LLaDA, bf16 for Dream). Also equals the dLLM-RL/SLIM LLaDA and
    Dream ports' `c ≥ τ, else argmax` rule."""
    b = conf.shape[0]
    rank = descending_rank(conf, masked)
    return masked & ((rank == 0) | (conf >= threshold_in(tau, conf.dtype, b)))


def commit_fast_dllm_factor(conf, masked, factor: float) -> jax.Array:
    """Fast-dLLM v1 factor rule (`get_transfer_index_dynamic`): sorted masked confidences c_(r), thresholds θ_0 = -1,
    θ_r = 1 - f/(r+2); t = first r with c_(r) < θ_r, else |M|-1; t += 1 when t is 0 or |M|-1 (quirk: a failing last
    slot is still committed); commit the top t. `factor` is a Python float (thresholds built in float64 like the
    reference's Python list, then rounded to conf's dtype)."""
    b, k = conf.shape
    th = np.array([-1.0] + [1.0 - factor / (r + 2) for r in range(1, k)], dtype=np.float64)
    th = jnp.asarray(th, dtype=conf.dtype)[None, :]                      # [1, K]
    order, rank = _sort_rows(conf, masked, descending=True)
    sorted_conf = jnp.take_along_axis(conf, order, axis=1)
    n_m = _n_masked(masked)
    pos = lax.broadcasted_iota(jnp.int32, (b, k), 1)
    fail = (pos < n_m) & (sorted_conf < th)
    t = jnp.where(jnp.any(fail, axis=1, keepdims=True),
                  jnp.argmax(fail, axis=1, keepdims=True).astype(jnp.int32), n_m - 1)
    t = jnp.where((t == 0) | (t == n_m - 1), t + 1, t)
    t = jnp.where(n_m == 0, 0, t)
    return masked & (rank < t)


def commit_sequential(masked, n, *, masked_only: bool = True) -> jax.Array:
    """jetengine `sequential`: slots [first_masked, first_masked + n) of the block (nothing when none is masked)."""
    b, k = masked.shape
    first, any_m = _first_masked(masked)
    pos = lax.broadcasted_iota(jnp.int32, (b, k), 1)
    sel = any_m & (pos >= first) & (pos < first + _col(n, b))
    return sel & masked if masked_only else sel


def commit_contiguous_dynamic(conf, masked, n, tau) -> jax.Array:
    """jetengine `contiguous_dynamic`: candidates c > τ kept only in runs of ≥ 2 adjacent candidates, or alone at the
    first masked slot; if fewer than n are kept, the top-min(n, |M|) by confidence are added."""
    b, k = conf.shape
    cand = masked & (conf > threshold_in(tau, conf.dtype, b))
    prev = jnp.pad(cand[:, :-1], ((0, 0), (1, 0)))
    nxt = jnp.pad(cand[:, 1:], ((0, 0), (0, 1)))
    first, any_m = _first_masked(masked)
    pos = lax.broadcasted_iota(jnp.int32, (b, k), 1)
    kept = cand & (prev | nxt | (any_m & (pos == first)))
    n = _col(n, b)
    top = descending_rank(conf, masked) < jnp.minimum(n, _n_masked(masked))
    return jnp.where(jnp.sum(kept, axis=1, keepdims=True) < n, kept | top, kept) & masked


def commit_nlc_bounded_dynamic(conf, masked, n, nlc_budget) -> jax.Array:
    """jetengine `nlc_bounded_dynamic`: masked slots sorted by -log(max(c, 1e-8)) ascending; the longest prefix whose
    cumulative -log c stays ≤ the budget, at least n, at most |M|."""
    b, k = conf.shape
    dt = conf.dtype
    clamped = jnp.maximum(jnp.where(masked, conf, jnp.zeros_like(conf)), jnp.asarray(1e-8, dt))
    nlc = jnp.where(masked, round_to(-jnp.log(clamped.astype(_acc(dt))), dt), jnp.asarray(jnp.inf, dt))
    order, rank = _sort_rows(nlc, masked, descending=False)
    n_m = _n_masked(masked)
    valid = lax.broadcasted_iota(jnp.int32, (b, k), 1) < n_m
    cum = _sorted_cumsum(nlc, order, valid)
    count = jnp.sum(valid & (cum <= threshold_in(nlc_budget, dt, b)), axis=1, keepdims=True, dtype=jnp.int32)
    kk = jnp.minimum(jnp.maximum(count, _col(n, b)), n_m)
    return masked & (rank < kk)


def commit_gc_dynamic(conf, masked, steps_left, tau) -> jax.Array:
    """jetengine `gc_dynamic`: pace = ⌈|M| / max(1, steps_left)⌉, cap = max(pace, max(1, |M|//2));
    k = min(max(pace, min(#{c > τ}, cap)), |M|); top-k by confidence. `steps_left` = denoising_steps - current_step."""
    b = conf.shape[0]
    n_m = _n_masked(masked)
    sl = jnp.maximum(_col(steps_left, b), 1)
    pace = (n_m + sl - 1) // sl
    cap = jnp.maximum(pace, jnp.maximum(n_m // 2, 1))
    n_above = jnp.sum(masked & (conf > threshold_in(tau, conf.dtype, b)), axis=1, keepdims=True, dtype=jnp.int32)
    kk = jnp.minimum(jnp.maximum(pace, jnp.minimum(n_above, cap)), n_m)
    return masked & (descending_rank(conf, masked) < kk)


def commit_entropy_bounded(entropy, masked, eb_threshold) -> jax.Array:
    """jetengine `entropy_bounded`: masked slots sorted by entropy ascending; k = #{cumulative entropy < threshold}
    (searchsorted, left), at least 1. `entropy [B, K]` from `sampling.clamped_entropy` (float32 in the engine)."""
    b, k = entropy.shape
    order, rank = _sort_rows(entropy, masked, descending=False)
    valid = lax.broadcasted_iota(jnp.int32, (b, k), 1) < _n_masked(masked)
    cum = _sorted_cumsum(entropy, order, valid)
    count = jnp.sum(valid & (cum < threshold_in(eb_threshold, entropy.dtype, b)), axis=1, keepdims=True,
                    dtype=jnp.int32)
    return masked & (rank < jnp.maximum(count, 1))


# ----------------------------------------------------------------------------------------------------------------------
# stochastic rules (PRNG key, or externally supplied noise for replay, §8.4)

def _noise(key, noise, shape, name: str, sampler):
    if (key is None) == (noise is None):
        raise ValueError(f"pass exactly one of key= and {name}=")
    return jnp.asarray(noise) if noise is not None else sampler(key, shape)


def commit_random_top_n(masked, n, *, key=None, uniforms=None, masked_only: bool = True) -> jax.Array:
    """LLaDA remasking='random': confidence = fresh U(0,1) float32 per slot, then top-n (tokens still come from x0)."""
    u = _noise(key, uniforms, masked.shape, "uniforms", lambda kk, s: jax.random.uniform(kk, s, jnp.float32))
    return commit_top_n(u, masked, n, masked_only=masked_only)


def commit_dream_origin(masked, p_transfer, *, key=None, uniforms=None) -> jax.Array:
    """Dream alg='origin': each masked slot is committed when its uniform v < p_transfer (float32 compare).

    `p_transfer` = 1 - t[i+1]/t[i] (float32 schedule) or 1 at the last step; scalar or per-row."""
    u = _noise(key, uniforms, masked.shape, "uniforms", lambda kk, s: jax.random.uniform(kk, s, jnp.float32))
    p = jnp.asarray(p_transfer, jnp.float32)
    p = p.reshape(-1, 1) if p.ndim else p
    return masked & (u.astype(jnp.float32) < p)


def commit_dream_topk(conf, masked, k, *, alg_temp=None, key=None, gumbel=None,
                      masked_only: bool = True) -> jax.Array:
    """Dream confidence algorithms' selection: top-k of C (alg_temp None/0), else k slots sampled without replacement
    from softmax(C / alg_temp) over the masked slots, done as Gumbel-top-k (`gumbel [B, K]` replays the draws)."""
    if alg_temp is None or (isinstance(alg_temp, (int, float)) and alg_temp == 0):
        return commit_top_n(conf, masked, k, masked_only=masked_only)
    g = _noise(key, gumbel, conf.shape, "gumbel", lambda kk, s: jax.random.gumbel(kk, s, jnp.float32))
    scores = jnp.where(masked, conf.astype(jnp.float32) / alg_temp + g.astype(jnp.float32), -jnp.inf)
    return commit_top_n(scores, masked, k, masked_only=masked_only)
