"""Plain NumPy re-statements of the decoders' commit rules and samplers, written from the specs
(`models_decoders.md` §6, `slimrl_tracerl.md` §0.3, the SLIM-RL jetengine `scheduler.py` semantics) in the
reference's own style: per-row Python loops, explicit sorts, sequential cumulative sums, torch's dtype behaviour
(a Python-float threshold is rounded to the tensor dtype; half types compute each op in float32 and round).
Independent of dlmjax on purpose: never import it here.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def acc_of(dt):
    return np.float64 if np.dtype(dt) == np.float64 else np.float32


def rnd(x, dt):
    """Round to dt (through float32 for half types, as c10 does for a Python double)."""
    dt = np.dtype(dt)
    x = np.asarray(x, np.float64)
    if dt.itemsize == 2:
        x = x.astype(np.float32)
    return x.astype(dt)


def f64(x):
    return np.asarray(x).astype(np.float64)


def topk_idx(values_row, k):
    """torch.topk indices with ties to the lower index (stable descending sort)."""
    k = max(0, min(int(k), len(values_row)))
    return np.argsort(-f64(values_row), kind="stable")[:k]


def masked_conf(conf_row, mask_row):
    return np.where(mask_row, f64(conf_row), -np.inf)


def next_up(x, dt, ulps):
    dt = np.dtype(dt)
    ut = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    a = np.array(x, dtype=dt).reshape(1)
    return (a.view(ut).astype(np.int64) + ulps).astype(ut).view(dt)[0]


# ----------------------------------------------------------------------------------------------------------------------
# rules (conf [B,K] in its dtype, masked [B,K] bool, n [B] ints)

def top_n(conf, masked, n, masked_only=True):
    out = np.zeros(masked.shape, bool)
    for j in range(conf.shape[0]):
        c = masked_conf(conf[j], masked[j])
        out[j, topk_idx(c, n[j])] = True
    return out & masked if masked_only else out


def dynamic_threshold(conf, masked, n, tau, masked_only=True):
    out = np.zeros(masked.shape, bool)
    t = f64(rnd(tau, conf.dtype))
    for j in range(conf.shape[0]):
        c = masked_conf(conf[j], masked[j])
        sel = c > t
        if sel.sum() < n[j]:
            sel[topk_idx(c, n[j])] = True
        out[j] = sel
    return out & masked if masked_only else out


def tau_budget(conf, masked, n, tau, m=1.0, budget_ulps=1):
    """SLIM-RL scheduler branch `tau_budget_dynamic`, in conf's dtype with float32/64 sequential partial sums."""
    dt, acc = conf.dtype, acc_of(conf.dtype)
    out = np.zeros(masked.shape, bool)
    t = f64(rnd(tau, dt))
    for j in range(conf.shape[0]):
        c = masked_conf(conf[j], masked[j])
        above = conf[j][(c > t)]
        k_budget = 0
        if above.size:
            srt = above[np.argsort(-f64(above), kind="stable")]
            m_eff = m if m > 0 else int(n[j])
            budget = m_eff * (1.0 - tau)                                   # Python double, like the reference
            limit = f64(next_up(rnd(budget, dt), dt, budget_ulps))
            s = acc(0)
            for v in srt:
                u = rnd(acc(1.0) - acc(v), dt)                             # 1.0 - sorted_conf in dt
                s = acc(s + acc(u))
                if f64(rnd(s, dt)) <= limit:
                    k_budget += 1
        k = min(max(k_budget, int(n[j])), int(masked[j].sum()))
        out[j, topk_idx(c, k)] = True
    return out


def fast_dllm_threshold(conf, masked, tau):
    out = np.zeros(masked.shape, bool)
    t = f64(rnd(tau, conf.dtype))
    for j in range(conf.shape[0]):
        c = masked_conf(conf[j], masked[j])
        kk = int(masked[j].sum())
        idx = topk_idx(c, kk)
        out[j, idx] = True
        for r in range(1, kk):
            if c[idx[r]] < t:
                out[j, idx[r]] = False
    return out


def fast_dllm_factor(conf, masked, factor):
    out = np.zeros(masked.shape, bool)
    for j in range(conf.shape[0]):
        kk = int(masked[j].sum())
        if kk == 0:
            continue
        c = masked_conf(conf[j], masked[j])
        threshs = [1 - factor / (q + 1) for q in range(1, kk + 1)]
        threshs[0] = -1
        srt = np.sort(f64(conf[j][masked[j]]))[::-1]
        top_i = 0
        for top_i in range(len(threshs)):
            if srt[top_i] < f64(rnd(threshs[top_i], conf.dtype)):
                break
        if top_i == 0 or top_i == len(threshs) - 1:
            top_i += 1
        out[j, topk_idx(c, top_i)] = True
    return out


def sequential(masked, n, masked_only=True):
    out = np.zeros(masked.shape, bool)
    K = masked.shape[1]
    for j in range(masked.shape[0]):
        if masked[j].any():
            first = int(np.nonzero(masked[j])[0].min())
            out[j, first:min(first + int(n[j]), K)] = True
    return out & masked if masked_only else out


def contiguous_dynamic(conf, masked, n, tau):
    out = np.zeros(masked.shape, bool)
    t = f64(rnd(tau, conf.dtype))
    for j in range(conf.shape[0]):
        c = masked_conf(conf[j], masked[j])
        sel = list((c > t) & masked[j])
        first = int(np.nonzero(masked[j])[0].min()) if masked[j].any() else -1
        filt = np.zeros(len(sel), bool)
        i = 0
        while i < len(sel):
            if not sel[i]:
                i += 1
                continue
            start = i
            while i < len(sel) and sel[i]:
                i += 1
            if i - start >= 2:
                filt[start:i] = True
            elif start == first:
                filt[start] = True
        if filt.sum() < n[j]:
            filt[topk_idx(c, min(int(n[j]), int(masked[j].sum())))] = True
        out[j] = filt
    return out


def nlc_bounded_dynamic(conf, masked, n, budget):
    dt, acc = conf.dtype, acc_of(conf.dtype)
    out = np.zeros(masked.shape, bool)
    for j in range(conf.shape[0]):
        c0 = np.where(masked[j], f64(conf[j]), 0.0)
        clamped = np.maximum(c0, f64(rnd(1e-8, dt)))
        nlc = np.where(masked[j], f64(rnd(-np.log(clamped.astype(acc)), dt)), np.inf)
        order = np.argsort(nlc, kind="stable")
        nm = int(masked[j].sum())
        s, valid = acc(0), 0
        for q in range(nm):
            s = acc(s + acc(nlc[order[q]]))
            if f64(rnd(s, dt)) <= f64(rnd(budget, dt)):
                valid += 1
        k = min(max(valid, int(n[j])), nm)
        out[j, order[:k]] = True
    return out


def gc_dynamic(conf, masked, steps_left, tau):
    out = np.zeros(masked.shape, bool)
    t = f64(rnd(tau, conf.dtype))
    for j in range(conf.shape[0]):
        c = masked_conf(conf[j], masked[j])
        remaining = int(masked[j].sum())
        rs = max(1, int(steps_left[j]))
        min_pace = math.ceil(remaining / rs)
        cap = max(min_pace, max(1, remaining // 2))
        n_above = int((c > t).sum())
        k = min(max(min_pace, min(n_above, cap)), remaining)
        out[j, topk_idx(c, k)] = True
    return out


def entropy_bounded(ent, masked, thr):
    dt, acc = ent.dtype, acc_of(ent.dtype)
    out = np.zeros(masked.shape, bool)
    for j in range(ent.shape[0]):
        idx = np.nonzero(masked[j])[0]
        e = f64(ent[j][idx])
        order = np.argsort(e, kind="stable")
        cum, s = [], acc(0)
        for q in order:
            s = acc(s + acc(e[q]))
            cum.append(f64(rnd(s, dt)))
        k = int(np.searchsorted(np.array(cum), f64(rnd(thr, dt)), side="left")) if cum else 0
        k = max(k, 1)
        out[j, idx[order[:k]]] = True
    return out


def dream_origin(masked, p_transfer, uniforms):
    return masked & (uniforms.astype(np.float32) < np.float32(p_transfer))


def dream_gumbel_topk(conf, masked, k, alg_temp, gumbel):
    scores = np.where(masked, conf.astype(np.float32) / np.float32(alg_temp) + gumbel.astype(np.float32), -np.inf)
    return top_n(scores.astype(np.float32), masked, k)


# ----------------------------------------------------------------------------------------------------------------------
# samplers and confidences (logits [R, V])

def softmax(logits, dt):
    """Exact softmax (float64), rounded to float32 first for half types (the JAX/torch float32 opmath), then dt."""
    x = f64(logits)
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return rnd(p, dt) if np.dtype(dt) != np.float64 else p


def top_k_keep(logits, k):
    keep = np.ones(logits.shape, bool)
    if not k or k <= 0:
        return keep
    for j in range(logits.shape[0]):
        kth = np.sort(f64(logits[j]))[::-1][min(k, logits.shape[1]) - 1]
        keep[j] = f64(logits[j]) >= kth
    return keep


def top_p_keep(logits, top_p, prob_dtype, eps=0.0):
    """Dream/SDAR `top_p_logits`: stable descending sort, cumsum of rounded probabilities (float32 partial sums,
    each output rounded to prob_dtype), remove where cum > top_p, shifted right, first kept. `eps` perturbs the
    cumulative sums (used by tests to detect decisions that sit on a rounding boundary)."""
    pd = np.dtype(prob_dtype)
    acc = acc_of(pd)
    keep = np.ones(logits.shape, bool)
    if top_p is None or top_p >= 1:
        return keep
    pt = f64(rnd(top_p, pd))
    p = f64(softmax(logits, pd))
    for j in range(logits.shape[0]):
        order = np.argsort(-f64(logits[j]), kind="stable")
        s, remove = acc(0), np.zeros(logits.shape[1], bool)
        for pos, i in enumerate(order):
            s = acc(s + acc(p[j, i]))
            remove[pos] = f64(rnd(f64(s) * (1 + eps), pd)) > pt
        remove[1:] = remove[:-1].copy()
        remove[0] = False
        keep[j, order] = ~remove
    return keep


def gumbel_argmax_llada(logits, temperature, uniforms):
    if temperature == 0:
        return np.argmax(f64(logits), -1)
    return np.argmax(np.exp(f64(logits)) / (-np.log(f64(uniforms))) ** temperature, -1)


def token_confidence(logits, tokens, dt):
    p = softmax(logits, dt)
    return p[np.arange(len(tokens)), tokens]


def max_confidence(logits, dt):
    p = softmax(logits, dt)
    idx = np.argmax(f64(p), -1)
    return p[np.arange(len(idx)), idx], idx


def margin_confidence(logits, dt):
    p = softmax(logits, dt)
    acc = acc_of(dt)
    out = []
    for j in range(p.shape[0]):
        s = np.sort(f64(p[j]))[::-1]
        out.append(rnd(acc(s[0]) - acc(s[1]), dt) if np.dtype(dt) != np.float64 else s[0] - s[1])
    return np.array(out, dtype=dt)


def neg_entropy_confidence(logits, dt, eps=1e-10):
    """Dream: torch ops on a dt tensor: p + eps, log, p * log each rounded to dt; the sum accumulates in float32
    (float64 for float64) and is rounded once. fp16: 1e-10 underflows, so p = 0 gives 0·log 0 = NaN, as in torch."""
    p = softmax(logits, dt)
    acc = acc_of(dt)
    exact = np.dtype(dt) == np.float64
    pa = p.astype(acc)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = pa + acc(eps) if exact else rnd(pa + acc(eps), dt).astype(acc)
        lg = np.log(a) if exact else rnd(np.log(a), dt).astype(acc)
        prod = pa * lg if exact else rnd(pa * lg, dt).astype(acc)
    s = prod.sum(-1, dtype=acc)
    return s if exact else rnd(s, dt)


def clamped_entropy(p, eps=1e-12):
    pc = np.maximum(f64(p), f64(rnd(eps, p.dtype)))
    return -(pc * np.log(pc)).sum(-1)
