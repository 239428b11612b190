"""Token samplers and confidence definitions of the dLLM decoders, as pure, jit-compatible JAX functions.

Shapes: logits `[..., V]` (any leading dims, e.g. `[B, K, V]`), tokens/confidences `[...]`. Specs:
`models_decoders.md` §1.5 (N4 softmax dtype, N5 comparisons, N6 argmax), §6.1-6.3, §8.4; choices in
BUILD_NOTES.md ("Rule and sampler choices").

Numerics: probabilities are `softmax(f32(logits))` rounded once to the reference's dtype (N4; float64 computes in
float64 and needs x64). Multi-op confidences (margin, negative entropy) round after every op like torch on half
types. Randomness: every stochastic function takes a PRNG `key` or the noise itself (`gumbel`, `uniforms`) or the
sampled `tokens`, so tests can replay the reference's draws (§8.4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dlmjax.decode.rules import round_to

__all__ = [
    "probs", "apply_temperature", "top_k_keep", "top_p_keep", "filter_logits", "forbid_token", "greedy",
    "first_argmax", "sample_categorical", "gumbel_argmax_llada", "token_confidence", "max_confidence",
    "margin_confidence", "neg_entropy_confidence", "clamped_entropy", "sample_llada", "sample_dream", "sample_sdar",
]


def _acc(dtype) -> jnp.dtype:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _require_x64(what: str) -> None:
    if jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError(f"{what} needs float64: enable x64 (e.g. `with jax.enable_x64(True):` around tracing)")


def _r(x: jax.Array, dtype) -> jax.Array:
    """Round an accumulation-dtype value to `dtype` and come back (one torch op on a half-type tensor)."""
    return round_to(x, dtype).astype(x.dtype)


def probs(logits: jax.Array, dtype=None) -> jax.Array:
    """softmax over the last axis, computed in float32 (float64 if dtype is float64), rounded once to `dtype` (N4)."""
    dtype = jnp.dtype(dtype or logits.dtype)
    if dtype == jnp.float64:
        _require_x64("float64 probabilities")
    return round_to(jax.nn.softmax(logits.astype(_acc(dtype)), axis=-1), dtype)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """ℓ / T in the logits' dtype; T ≤ 0 or T == 1 leaves ℓ unchanged.

    A Python-float T is applied as torch's CUDA kernel does for a scalar divisor: multiply by the float32 reciprocal
    1/f32(T) (float64 for float64 logits), one rounding to the logits' dtype. An array T divides."""
    if isinstance(temperature, (int, float)):
        if temperature <= 0 or temperature == 1:
            return logits
        acc = np.dtype(_acc(logits.dtype))
        inv = acc.type(1.0) / acc.type(temperature)                      # host constant, not left to XLA
        return round_to(logits.astype(acc) * inv, logits.dtype)
    return round_to(logits.astype(_acc(logits.dtype)) / temperature, logits.dtype)


def forbid_token(logits: jax.Array, token_id: int | None) -> jax.Array:
    """Set one token's logit to -inf (the `forbid_mask_token` flag: never sample the mask token; off = reference)."""
    if token_id is None:
        return logits
    # an elementwise select, not `.at[..., id].set`: the scatter made XLA:CPU's later reductions 3x slower
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(vocab == token_id, jnp.asarray(-jnp.inf, logits.dtype), logits)


def top_k_keep(logits: jax.Array, k: int | None) -> jax.Array:
    """Keep-mask of top-k filtering: logits ≥ the k-th largest are kept (ties at the k-th value all kept, like
    `logits < topk(logits, k)[..., -1]` removal). k None or ≤ 0 keeps everything (SDAR top_k=0 = off)."""
    if k is None or k <= 0:
        return jnp.ones(logits.shape, bool)
    kth = lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
    return logits >= kth


def _order_key(x: jax.Array) -> jax.Array:
    """Monotone map float -> unsigned int (IEEE total order) so thresholds can be searched bit by bit."""
    ut = {4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), ut)   # -0.0 ties +0.0, as in torch
    sign = bits >> (8 * x.dtype.itemsize - 1)
    top = ut(1) << (8 * x.dtype.itemsize - 1)
    return jnp.where(sign == 1, ~bits, bits | top)


def top_p_keep(logits: jax.Array, top_p: float | None, *, prob_dtype=None, candidates: int = 256,
               chunk_bytes: int = 4 << 20) -> jax.Array:
    """Keep-mask of nucleus filtering with the references' shifted-removal rule, without a vocabulary sort.

    Fast path: the `candidates` largest logits (lax.top_k; ties lower index first), their rounded probabilities,
    a cumulative sum in the references' order and the shifted removal. It decides a row exactly when the nucleus
    ends inside the candidates (some candidate is removed). Rows it cannot decide go to the bisection below
    (`_top_p_keep_bisect`) chunk by chunk: chunks of about `chunk_bytes` of logits (lax.map) keep the bisection's
    32 passes on cache-resident data (2-3x faster than streaming [N, V] from memory each pass), and a chunk whose
    rows were all decided skips it. Results never depend on `candidates` or the chunking.
    """
    if top_p is None or (isinstance(top_p, (int, float)) and top_p >= 1):
        return jnp.ones(logits.shape, bool)
    v = logits.shape[-1]
    pd = jnp.dtype(prob_dtype or logits.dtype)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, v)                                         # [N, V]
    p_t = jnp.asarray(top_p, dtype=pd) if isinstance(top_p, (int, float)) else round_to(jnp.asarray(top_p), pd)
    p_t = jnp.broadcast_to(p_t, lead).reshape(-1)                        # [N]
    n = flat.shape[0]
    rows = max(1, min(n, chunk_bytes // (v * flat.dtype.itemsize)))
    chunks = -(-n // rows)
    rows = -(-n // chunks)                                               # even chunks; pad rows repeat the last row
    pad = chunks * rows - n
    if candidates <= 0 or candidates >= v:
        fast, decided = jnp.zeros(flat.shape, bool), jnp.zeros((n,), bool)
    else:
        fast, decided = _top_p_fast(flat, p_t, pd, candidates)

    def chunk(xs):                                                       # [r, V], [r], [r, V], [r]
        x, pt, f, d = xs
        return lax.cond(jnp.all(d), lambda: f, lambda: _top_p_keep_bisect(x, pt, prob_dtype=pd))

    def all_chunks():
        xs = (flat, p_t, fast, decided)
        xs = jax.tree.map(lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1), mode="edge")
                          .reshape((chunks, rows) + a.shape[1:]), xs)
        return lax.map(chunk, xs).reshape(-1, v)[:n]

    keep = lax.cond(jnp.all(decided), lambda: fast, all_chunks)
    return keep.reshape(logits.shape)


def _top_p_candidates(flat: jax.Array, p_t: jax.Array, pd, candidates: int):
    """The top `candidates` logits of each row [N, V]: (values, indices, removed) [N, C] under the shifted removal
    rule, and which rows [N] they decide exactly (some candidate removed: the nucleus ends inside them)."""
    p = probs(flat, pd).astype(_acc(pd))
    vals, idx = lax.top_k(flat, candidates)                              # [N, C] logit-descending, index-ascending
    ps = jnp.take_along_axis(p, idx, axis=-1)
    cum_before = jnp.concatenate([jnp.zeros_like(ps[:, :1]), jnp.cumsum(ps, axis=-1)[:, :-1]], axis=-1)
    removed = round_to(cum_before, pd) > p_t[:, None]                    # shifted removal; candidate 0 always kept
    return vals, idx, removed, jnp.any(removed, axis=-1)


def _top_p_fast(flat: jax.Array, p_t: jax.Array, pd, candidates: int):
    """Nucleus keep-mask [N, V] from the top `candidates` logits, and which rows [N] it decides exactly."""
    _, idx, removed, decided = _top_p_candidates(flat, p_t, pd, candidates)
    rows = jnp.arange(flat.shape[0])[:, None]
    return jnp.zeros(flat.shape, bool).at[rows, idx].set(~removed), decided


def _top_p_keep_bisect(logits: jax.Array, top_p, *, prob_dtype=None) -> jax.Array:
    """Nucleus keep-mask by bisection over the logits' order keys (exact for any nucleus width).

    Reference (Dream / SDAR): sort logits descending, p = softmax rounded to `prob_dtype` (default: the logits'
    dtype), cum = cumsum(p) (float32 partial sums rounded to prob_dtype), remove sorted token j iff cum[j-1] > top_p
    (compared in prob_dtype); the top token is always kept. Equivalently token i is kept iff the mass of the tokens
    before it in (logit descending, index ascending) order stays ≤ top_p. A bisection over the logits' order keys
    finds the last removed logit value (32/64 masked reductions); exact logit ties at the boundary are resolved by
    index with one cumulative count. top_p None or ≥ 1 keeps everything; an array top_p (scalar or per row `[...]`)
    is traced (then ≥ 1 keeps everything through the same search).
    """
    if top_p is None or (isinstance(top_p, (int, float)) and top_p >= 1):
        return jnp.ones(logits.shape, bool)
    pd = jnp.dtype(prob_dtype or logits.dtype)
    acc = _acc(pd)
    p = probs(logits, pd).astype(acc)                                    # [..., V] rounded probabilities
    p_t = jnp.asarray(top_p, dtype=pd) if isinstance(top_p, (int, float)) else round_to(jnp.asarray(top_p), pd)
    key = _order_key(logits.astype(jnp.float64 if logits.dtype == jnp.float64 else jnp.float32))
    ut = key.dtype
    nbits = 8 * ut.itemsize

    def too_much(kl):                                                    # round(mass of logits > kl) > top_p
        mass = jnp.sum(jnp.where(key > kl[..., None], p, 0.0), axis=-1)
        return round_to(mass, pd) > p_t

    def body(i, lo_hi):                                                  # invariant: too_much(lo), not too_much(hi)
        lo, hi = lo_hi
        mid = lo + (hi - lo) // ut.type(2)
        t = too_much(mid)
        return jnp.where(t, mid, lo), jnp.where(t, hi, mid)

    lo0 = jnp.zeros(logits.shape[:-1], ut)
    hi0 = jnp.full(logits.shape[:-1], jnp.iinfo(ut).max, ut)
    lo, _ = lax.fori_loop(0, nbits, body, (lo0, hi0))
    keep_all = ~too_much(lo0)                                            # even the whole vocabulary fits in top_p
    above = key > lo[..., None]                                          # kept except for ties at the boundary
    k_star = jnp.min(jnp.where(above, key, jnp.array(jnp.iinfo(ut).max, ut)), axis=-1, keepdims=True)
    tie = key == k_star                                                  # equal logits: equal probabilities
    p_star = jnp.max(jnp.where(tie, p, 0.0), axis=-1, keepdims=True)
    mass_star = jnp.sum(jnp.where(key > k_star, p, 0.0), axis=-1, keepdims=True)
    before = lax.cond(jnp.any(jnp.sum(tie, axis=-1) > 1),                 # earlier ties (lower index first);
                      lambda: jnp.cumsum(tie.astype(jnp.int32), axis=-1) - tie,   # the cumsum only when a row
                      lambda: jnp.zeros(tie.shape, jnp.int32))           # has a boundary tie (it costs 4 passes)
    p_tv = p_t[..., None] if p_t.ndim else p_t
    tie_ok = round_to(mass_star + before.astype(acc) * p_star, pd) <= p_tv
    return (key > k_star) | (tie & tie_ok) | keep_all[..., None]


def filter_logits(logits: jax.Array, *, temperature=None, top_k=None, top_p=None, top_p_first: bool = True,
                  prob_dtype=None, forbid: int | None = None) -> jax.Array:
    """Temperature, then top-p and top-k in the reference's order (Dream: top-p then top-k; SDAR generate.py and
    jetengine: top-k then top-p); removed logits become -inf (Dream writes finfo.min: same probabilities).
    `forbid` sets that token's logit to -inf first (off by default, as in the references)."""
    x = apply_temperature(forbid_token(logits, forbid), temperature if temperature is not None else 1.0)
    ninf = jnp.asarray(-jnp.inf, x.dtype)
    steps = ["p", "k"] if top_p_first else ["k", "p"]
    for s in steps:
        keep = top_p_keep(x, top_p, prob_dtype=prob_dtype) if s == "p" else top_k_keep(x, top_k)
        x = jnp.where(keep, x, ninf)
    return x


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first index on ties, first NaN wins) as two plain reductions: a max, then the
    least index holding it. XLA:CPU runs argmax's (value, index) reduce unvectorised: 7.2 vs 2.7 ms for 64 x 49k."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == m) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, iota, x.shape[-1] - 1), axis=-1)


def greedy(logits: jax.Array) -> jax.Array:
    """argmax over the vocabulary, first index on ties (N6)."""
    return first_argmax(logits)


def _need_one(**kw):
    given = [k for k, v in kw.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of {', '.join(kw)} (got {given or 'none'})")
    return given[0]


def sample_categorical(logits: jax.Array, *, key=None, gumbel=None, tokens=None, uniforms=None) -> jax.Array:
    """One draw from softmax(ℓ) per row (-inf never drawn): with a `key`, inverse-CDF sampling with one uniform per
    row (`uniforms` [...] replays them); or Gumbel-max with replayed `gumbel` noise `[..., V]`; or externally sampled
    `tokens` `[...]` returned as they are. The references draw with torch.multinomial, itself an inverse CDF; one
    uniform per row instead of V Gumbel draws is ~10x less work (the Gumbel noise of 64 rows x 49k cost 43 ms)."""
    which = _need_one(key=key, gumbel=gumbel, tokens=tokens, uniforms=uniforms)
    if which == "tokens":
        return jnp.asarray(tokens).astype(jnp.int32)
    if which == "gumbel":
        return first_argmax(logits.astype(jnp.float32) + gumbel.astype(jnp.float32))
    u = uniforms if which == "uniforms" else jax.random.uniform(key, logits.shape[:-1], jnp.float32)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    lead, v = p.shape[:-1], p.shape[-1]
    return _inverse_cdf(p.reshape(-1, v), jnp.asarray(u, jnp.float32).reshape(-1)).reshape(lead)


def _inverse_cdf(p: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Index i with C[i-1] <= u * C[V-1] < C[i] (C = cumsum p) per row of p [N, V] >= 0, u [N] in [0, 1), in two
    levels (block sums, then one block) so no [N, V] cumsum runs; a zero-probability index is never returned."""
    n, v = p.shape
    nb = -(-v // block)
    pb = jnp.pad(p, ((0, 0), (0, nb * block - v))).reshape(n, nb, block)
    bcum = jnp.cumsum(jnp.sum(pb, axis=-1), axis=-1)                     # [N, nb]
    target = u * bcum[:, -1]
    # the first block / slot whose cumulative sum exceeds the target: its own mass is > 0 (the sum grew there); a
    # target at or past the end (f32 rounding between the two levels) falls back to the last nonzero block / slot
    blk = jnp.minimum(jnp.sum(bcum <= target[:, None], axis=-1), _last_rise(bcum, jnp.zeros((n,), bcum.dtype)))
    inner = jnp.take_along_axis(pb, blk[:, None, None], axis=1)[:, 0]    # [N, block]
    before = jnp.where(blk > 0, jnp.take_along_axis(bcum, jnp.maximum(blk - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    icum = before[:, None] + jnp.cumsum(inner, axis=-1)
    idx = jnp.minimum(jnp.sum(icum <= target[:, None], axis=-1), _last_rise(icum, before))
    return (blk * block + idx).astype(jnp.int32)


def _last_rise(cum: jax.Array, start: jax.Array) -> jax.Array:
    """Per row of cum [N, M] (a running sum that began at start [N]), the last index where it strictly grew."""
    grew = cum > jnp.concatenate([start[:, None], cum[:, :-1]], axis=-1)
    return cum.shape[-1] - 1 - jnp.argmax(grew[:, ::-1], axis=-1)


def gumbel_argmax_llada(logits: jax.Array, temperature: float, *, key=None, uniforms=None,
                        float64: bool = True) -> jax.Array:
    """LLaDA `add_gumbel_noise` + argmax: T == 0 → argmax ℓ; else argmax exp(ℓ64) / (-log u)^T with float64 u.

    float64=True needs x64 (`jax.enable_x64`). float64=False is the float32 fallback argmax(ℓ - T·log(-log u)):
    the same draw in exact arithmetic, but rounding can pick a different token where two scores nearly tie.
    """
    if temperature == 0:
        return greedy(logits)
    _need_one(key=key, uniforms=uniforms)
    if float64:
        _require_x64("LLaDA's float64 Gumbel path")
        u = jnp.asarray(uniforms, jnp.float64) if uniforms is not None else \
            jax.random.uniform(key, logits.shape, jnp.float64)
        score = jnp.exp(logits.astype(jnp.float64)) / (-jnp.log(u)) ** temperature
    else:
        u = jnp.asarray(uniforms).astype(jnp.float32) if uniforms is not None else \
            jax.random.uniform(key, logits.shape, jnp.float32)
        score = logits.astype(jnp.float32) - temperature * jnp.log(-jnp.log(u))
    return first_argmax(score)


def token_confidence(logits: jax.Array, tokens: jax.Array, dtype=None) -> jax.Array:
    """p[token] with p = softmax rounded to `dtype` (LLaDA bf16 untempered, Fast-dLLM float64, SDAR fp16 filtered).

    Computed as softmax computes that entry, exp(ℓ_t - max ℓ) / Σ exp(ℓ - max ℓ), from the gathered logit: gathering
    from the [.., V] probabilities next to an argmax made XLA:CPU fuse the two into a 20 ms pass (64 x 49k rows)."""
    dtype = jnp.dtype(dtype or logits.dtype)
    if dtype == jnp.float64:
        _require_x64("float64 probabilities")
    x = logits.astype(_acc(dtype))
    m = jnp.max(x, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(x - m), axis=-1)
    xt = jnp.take_along_axis(x, tokens[..., None].astype(jnp.int32), axis=-1)
    return round_to(jnp.exp(xt - m)[..., 0] / total, dtype)


def max_confidence(logits: jax.Array, dtype=None):
    """(max p, first argmax of p) on the rounded probabilities: Dream T == 0 `probs.max(-1)`. Two tokens whose
    probabilities round to the same value tie even when their logits differ; the lower index wins."""
    p = probs(logits, dtype)
    return jnp.max(p, axis=-1), first_argmax(p)


def margin_confidence(logits: jax.Array, dtype=None) -> jax.Array:
    """p_(1) - p_(2) of the rounded probabilities, the difference rounded to `dtype` (Dream topk_margin)."""
    p = probs(logits, dtype)
    top2 = lax.top_k(p, 2)[0].astype(_acc(p.dtype))
    return round_to(top2[..., 0] - top2[..., 1], p.dtype)


def neg_entropy_confidence(logits: jax.Array, dtype=None, eps: float = 1e-10) -> jax.Array:
    """Σ p·log(p + eps) (negative entropy, higher = more confident; Dream `entropy`), with torch's per-op rounding
    in `dtype`: p + eps, log, product each rounded; the sum accumulates in float32 and is rounded once."""
    p = probs(logits, dtype)
    dt = p.dtype
    pa = p.astype(_acc(dt))
    log_p = _r(jnp.log(_r(pa + eps, dt)), dt)
    return round_to(jnp.sum(_r(pa * log_p, dt), axis=-1), dt)


def clamped_entropy(p: jax.Array, eps: float = 1e-12) -> jax.Array:
    """jetengine `entropy_bounded` entropy: -Σ max(p, eps)·log(max(p, eps)) over the filtered probabilities."""
    dt = p.dtype
    pc = jnp.maximum(p.astype(_acc(dt)), _r(jnp.asarray(eps, _acc(dt)), dt))
    return round_to(-jnp.sum(_r(pc * _r(jnp.log(pc), dt), dt), axis=-1), dt)


# ----------------------------------------------------------------------------------------------------------------------
# per-reference compositions

def sample_llada(logits, *, temperature: float = 0.0, conf_dtype=None, key=None, uniforms=None,
                 float64: bool = True, forbid: int | None = None):
    """LLaDA / Fast-dLLM-LLaDA candidate and confidence: x0 = Gumbel argmax (float64 path when T > 0), confidence =
    softmax(ℓ)[x0] of the *untempered* logits in `conf_dtype` (default logits' dtype = bf16 original; pass float64
    for Fast-dLLM and the SLIM LLaDA port). Returns (x0, conf)."""
    x = forbid_token(logits, forbid)
    x0 = gumbel_argmax_llada(x, temperature, key=key, uniforms=uniforms, float64=float64)
    return x0, token_confidence(x, x0, conf_dtype)


def sample_dream(logits, *, temperature: float = 0.0, top_p=None, top_k=None, alg: str = "maskgit_plus",
                 dtype=None, key=None, gumbel=None, tokens=None, forbid: int | None = None):
    """Dream `sample_tokens`, everything in `dtype` (default: the logits' dtype, bf16 in Dream; float32 for the SLIM
    Dream port's `logits.float()`): ℓ/T (T > 0), top-p then top-k, p = softmax; T > 0: x0 ~ p and c = p[x0];
    T == 0: (c, x0) = max p (first index). alg 'topk_margin' → c = p1 - p2, 'entropy' → c = Σ p log(p + 1e-10);
    'origin'/'maskgit_plus' keep c. `temperature` is a Python float. Returns (conf, x0)."""
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise ValueError(f"unknown Dream alg {alg!r}")
    dtype = jnp.dtype(dtype or logits.dtype)
    x = filter_logits(logits.astype(dtype), temperature=temperature if temperature > 0 else None, top_k=top_k, top_p=top_p,
                      top_p_first=True, prob_dtype=dtype, forbid=forbid)
    if temperature > 0:
        x0 = sample_categorical(x, key=key, gumbel=gumbel, tokens=tokens)
        conf = token_confidence(x, x0, dtype)
    else:
        conf, x0 = max_confidence(x, dtype)
    if alg == "topk_margin":
        conf = margin_confidence(x, dtype)
    elif alg == "entropy":
        conf = neg_entropy_confidence(x, dtype)
    return conf, x0


def sample_sdar(logits, *, temperature: float = 1.0, top_k: int | None = 0, top_p: float | None = 1.0,
                dtype=None, key=None, gumbel=None, tokens=None, greedy_decode: bool = False,
                forbid: int | None = None):
    """SDAR/TraDo `sample`, everything in `dtype` (default: the logits' dtype, fp16 in generate.py; jetengine, same
    order with float32 probabilities: dtype=float32): ℓ/T, top-k then top-p, p = softmax, x0 ~ p, p0 = p[x0].
    greedy_decode (A6, no reference mode): x0 = argmax ℓ, p0 = untempered softmax(ℓ)[x0]. Returns (x0, p0)."""
    x = forbid_token(logits.astype(dtype or logits.dtype), forbid)
    if greedy_decode:
        x0 = greedy(x)
        return x0, token_confidence(x, x0, dtype)
    nucleus = (key is not None and not top_k and isinstance(top_p, (int, float)) and 0 < top_p < 1
               and jnp.dtype(dtype or logits.dtype) != jnp.float64)
    if nucleus:
        return _sample_nucleus(apply_temperature(x, temperature), top_p, dtype or logits.dtype, key)
    x = filter_logits(x, temperature=temperature, top_k=top_k, top_p=top_p, top_p_first=False, prob_dtype=dtype)
    x0 = sample_categorical(x, key=key, gumbel=gumbel, tokens=tokens)
    return x0, token_confidence(x, x0, dtype)


def _sample_nucleus(x: jax.Array, top_p: float, dtype, key, candidates=(64, 256), uniforms=None):
    """Top-p filtering + one inverse-CDF draw + p[x0], as `filter_logits` -> `sample_categorical` ->
    `token_confidence`, but on the top `candidates` logits alone when every row's nucleus ends inside them: the
    kept candidates in vocabulary order carry the whole filtered distribution (the removed tokens have p = 0), so
    the draw and p[x0] need [N, C] work instead of three more [N, V] passes. Candidate counts are tried in turn
    (each only if a row is still undecided), then the full path for the rows left. Equal to the full path up to the
    order of f32 sums (a draw within ~1 ulp of a CDF step may differ). x: tempered logits [..., V] in `dtype`;
    returns (x0, p0) as `sample_sdar`."""
    pd = jnp.dtype(dtype)
    lead, v = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, v)                                              # [N, V]
    n = flat.shape[0]
    u = (jax.random.uniform(key, (n,), jnp.float32) if uniforms is None
         else jnp.asarray(uniforms, jnp.float32).reshape(-1))
    p_t = jnp.broadcast_to(jnp.asarray(top_p, pd), (n,))

    def from_candidates(c):
        vals, idx, removed, decided = _top_p_candidates(flat, p_t, pd, c)
        order = jnp.argsort(idx, axis=-1)                                # candidates in vocabulary order
        vals, idx, kept = (jnp.take_along_axis(a, order, axis=-1) for a in (vals, idx, ~removed))
        e = jnp.where(kept, jnp.exp(vals.astype(jnp.float32) - jnp.max(vals, axis=-1, keepdims=True)), 0.0)
        j = _inverse_cdf(e / jnp.sum(e, axis=-1, keepdims=True), u, block=c)
        x0 = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]
        p0 = round_to(jnp.take_along_axis(e, j[:, None], axis=-1)[:, 0] / jnp.sum(e, axis=-1), pd)
        return x0, p0, decided

    def full():
        xf = filter_logits(flat, top_p=top_p, prob_dtype=pd)
        x0 = sample_categorical(xf, uniforms=u)
        return x0, token_confidence(xf, x0, pd)

    def stage(sizes):
        if not sizes:
            return full()
        x0, p0, decided = from_candidates(min(sizes[0], v))

        def rest():
            r0, rp = stage(sizes[1:])
            return jnp.where(decided, x0, r0), jnp.where(decided, p0, rp)

        return lax.cond(jnp.all(decided), lambda: (x0, p0), rest)

    x0, p0 = stage(tuple(c for c in candidates if c < v))
    return x0.reshape(lead), p0.reshape(lead)
