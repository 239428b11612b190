"""NumPy / float64 re-statement of the RL rows, layout and losses, written from the spec
(shared/spec/slimrl_tracerl.md §0.5, §1.3-1.6, §2.3-2.5, §2.7, §7) as literal loops, independent of dlmjax.rl.

Random streams follow the order documented in dlmjax/rl/masking.py (the reproducibility contract), so the rows can be
compared one to one: slim -- per rollout, per node: u = rng.random(L1, float32), then rng.integers(L1) if nothing is
masked; random -- per rollout: u = rng.random(L1, float32), v = float32(rng.uniform(lo, hi, L1)).
"""

from __future__ import annotations

import math

import numpy as np


# --- quadrature and schedule (§1.3, §1.4, §7) ------------------------------------------------------------------------

def gauss_legendre(n):
    """Golub-Welsch: nodes = eigenvalues of the Jacobi matrix of Legendre polynomials, weights = 2 v0^2; then mapped
    to [0, 1] (t = (x + 1) / 2, w / 2)."""
    if n == 1:
        return np.array([0.5]), np.array([1.0])
    k = np.arange(1, n)
    beta = k / np.sqrt(4.0 * k * k - 1.0)
    x, v = np.linalg.eigh(np.diag(beta, 1) + np.diag(beta, -1))
    return (x + 1.0) / 2.0, v[0] ** 2  # 2 v0^2 / 2


def schedule(t, J, spread=0.2, shape="cosine", increasing=False):
    """p_j, j = 0..J-1, decreasing by default: cosine p_j = t + (sigma/2) cos(pi j / (J-1)); linear from t + sigma/2
    down to t - sigma/2; increasing reverses. J = 1: [t]."""
    if J == 1:
        return np.array([t])
    sigma = max(0.0, min(spread, 2 * min(t, 1 - t) - 1e-6))
    out = []
    for j in range(J):
        if shape == "cosine":
            out.append(t + sigma / 2 * math.cos(math.pi * j / (J - 1)))
        else:
            out.append(t + sigma / 2 - sigma * j / (J - 1))
    out = np.array(out)
    return out[::-1] if increasing else out


# --- rows -------------------------------------------------------------------------------------------------------------

def block_of(i, offset, K):
    return (offset + i) // K


def slim_rows(responses, lengths, L1, K, mask_id, rng, n_points=3, spread=0.2, shape="cosine", increasing=False,
              offsets=None):
    """list of (rollout, noisy [L1], targets [L1], weight)."""
    t_nodes, w_nodes = gauss_legendre(n_points)
    rows = []
    for i, resp in enumerate(responses):
        off = 0 if offsets is None else offsets[i]
        J = (off + L1 - 1) // K + 1
        for t, w in zip(t_nodes, w_nodes):
            p = schedule(t, J, spread, shape, increasing)
            u = rng.random(L1, dtype=np.float32)
            m = [bool(u[x] <= np.float32(p[block_of(x, off, K)])) for x in range(L1)]
            if not any(m):
                m[rng.integers(L1)] = True
            noisy = [mask_id if m[x] else resp[x] for x in range(L1)]
            tg = [m[x] and x < lengths[i] for x in range(L1)]
            if any(tg):
                rows.append((i, np.array(noisy), np.array(tg), w))
    return rows


def random_rows(responses, lengths, L1, mask_id, rng, lo=0.1, hi=0.9, coupled=False):
    prim, comp = [], []
    for i, resp in enumerate(responses):
        u = rng.random(L1, dtype=np.float32)
        v = rng.uniform(lo, hi, L1).astype(np.float32)
        m = [bool(u[x] <= v[x]) for x in range(L1)]
        for mm, out in ((m, prim), ([not a for a in m], comp)):
            noisy = [mask_id if mm[x] else resp[x] for x in range(L1)]
            tg = [mm[x] and x < lengths[i] for x in range(L1)]
            if any(tg):
                out.append((i, np.array(noisy), np.array(tg), 1.0))
    return prim + (comp if coupled else [])


def collapse(ids, s):
    """dLLM-RL's collapse_k_unique: the q-th distinct id (0-based) -> the last id of its group of s."""
    uniq = sorted(set(ids))
    rep = {v: uniq[min((q // s + 1) * s - 1, len(uniq) - 1)] for q, v in enumerate(uniq)}
    return [rep[x] for x in ids]


def tracerl_rows(responses, lengths, step_maps, L1, K, mask_id, shrink=1, offsets=None):
    """§2.3 pseudo-code: pads get max + 1, shrink per block, rounds over all blocks until nothing is left."""
    rows = []
    for i, resp in enumerate(responses):
        off = 0 if offsets is None else offsets[i]
        sm = list(step_maps[i][:L1])
        top = max(step_maps[i]) + 1 if len(step_maps[i]) else 1
        sm += [top] * (L1 - len(sm))
        blocks = [block_of(x, off, K) for x in range(L1)]
        for b in sorted(set(blocks)):
            idx = [x for x in range(L1) if blocks[x] == b]
            new = collapse([sm[x] for x in idx], shrink)
            for x, v in zip(idx, new):
                sm[x] = v
        used = [False] * L1
        while True:
            tgt = [False] * L1
            noisy = list(resp)
            for b in sorted(set(blocks)):
                idx = [x for x in range(L1) if blocks[x] == b and not used[x]]
                if not idx:
                    continue
                mu = min(sm[x] for x in idx)
                for x in idx:
                    if sm[x] == mu:
                        tgt[x] = True
                    if sm[x] >= mu:
                        noisy[x] = mask_id
            if not any(tgt):
                break
            for x in range(L1):
                used[x] = used[x] or tgt[x]
            tg = [tgt[x] and x < lengths[i] for x in range(L1)]
            if any(tg):
                rows.append((i, np.array(noisy), np.array(tg), 1.0))
    return rows


# --- layout (§0.5, §7) ------------------------------------------------------------------------------------------------

def positions(prompt_valid, L1):
    out = []
    for pv in prompt_valid:
        row, c = [], 0
        for v in pv:
            row.append(c if v else 1)
            c += bool(v)
        resp = [c + i for i in range(L1)]
        out.append(row + resp + resp)
    return np.array(out)


def attention_mask(L0, L1, K, prompt_valid, align="response"):
    """Literal construction per row: the trainers' make_basic_block_attention + process_pad ("response"), or the
    same rules over absolute-position blocks ("absolute"; see dlmjax/rl/layout.py)."""
    N = L0 + 2 * L1
    out = np.zeros((len(prompt_valid), N, N), bool)
    for r, pv in enumerate(prompt_valid):
        P = int(np.sum(pv))
        A = np.zeros((N, N), bool)
        if align == "response":
            nb = (L1 + K - 1) // K
            for bi in range(nb):
                lo, hi = bi * K, min((bi + 1) * K, L1)
                for i in range(lo, hi):
                    A[L0 + L1 + i, :L0 + lo] = True  # noisy: prompt + clean blocks < bi
                    A[L0 + L1 + i, L0 + L1 + lo:L0 + L1 + hi] = True  # own noisy block
                    A[L0 + i, :L0 + hi] = True  # clean: prompt + clean blocks <= bi
            for bi in range((L0 + K - 1) // K):
                end, start = max(L0 - bi * K, 0), max(L0 - (bi + 1) * K, 0)
                A[start:end, :end] = True
        else:
            pos = [None] * L0
            c = 0
            for x in range(L0):
                if pv[x]:
                    pos[x] = c
                    c += 1
            rb = [(P + i) // K for i in range(L1)]
            for i in range(L1):
                for x in range(L0):
                    A[L0 + i, x] = A[L0 + L1 + i, x] = True
                for y in range(L1):
                    A[L0 + i, L0 + y] = rb[y] <= rb[i]
                    A[L0 + L1 + i, L0 + y] = rb[y] < rb[i]
                    A[L0 + L1 + i, L0 + L1 + y] = rb[y] == rb[i]
            for x in range(L0):
                qb = (pos[x] if pos[x] is not None else 1) // K
                for y in range(L0):
                    A[x, y] = pos[y] is not None and pos[y] // K <= qb
        for x in range(L0):
            if not pv[x]:
                A[:, x] = False  # prompt pads are never keys
        for x in range(L0):
            if not A[x].any():
                A[x, x] = True
        out[r] = A
    return out


# --- advantages (§1.6, §2.5, §7) --------------------------------------------------------------------------------------

def advantages(rewards, method):
    out = []
    for g in rewards:
        m = sum(g) / len(g)
        if method == "dr_grpo":
            out.append([r - m for r in g])
        else:
            sd = math.sqrt(sum((r - m) ** 2 for r in g) / len(g))
            out.append([0.0 if sd == 0 else (r - m) / sd for r in g])
    return np.array(out)


def keep_groups(rewards, adv, kind, lo=0.2, hi=0.8):
    if kind == "math":
        return np.array([lo <= sum(g) / len(g) <= hi for g in rewards])
    return np.array([any(a != 0 for a in g) for g in adv])


# --- losses (§1.5, §2.4, §7): loss = sum_i row_scale_i * per-row loss -------------------------------------------------

def _kl(d, est):
    if est == "k3":
        return math.exp(min(max(-d, -10.0), 10.0)) - 1 + d
    return 0.5 * d * d if est == "k2" else d


def row_losses(logp, logp_old, targets, adv, weight, row_scale, level, L1, low=0.1, high=0.1, eps=0.2, beta=0.01,
               kl="k3", weighted=True, blocks=None):
    """float64 loss of the batch and the per-row pieces: list of (surrogate, KL_row)."""
    total, pieces = 0.0, []
    for i in range(len(adv)):
        T = [t for t in range(L1) if targets[i][t]]
        d = {t: float(logp[i][t]) - float(logp_old[i][t]) for t in T}
        A = float(adv[i])
        if level == "sequence":
            s = math.exp(min(max(sum(d.values()) / max(len(T), 1), -10), 10))
            g = min(s * A, min(max(s, 1 - low), 1 + high) * A)
        elif level == "token":
            g = 0.0
            for t in T:
                rho = math.exp(min(max(d[t], -10), 10))
                g += min(rho * A, min(max(rho, 1 - eps), 1 + eps) * A)
            g /= L1
        else:
            g = 0.0
            for b in sorted(set(blocks[i][t] for t in T)):
                Tb = [t for t in T if blocks[i][t] == b]
                r = math.exp(min(max(sum(d[t] for t in Tb) / len(Tb), -10), 10))
                g += len(Tb) * min(r * A, min(max(r, 1 - low), 1 + high) * A)
            g /= L1
        K = sum(_kl(d[t], kl) for t in T) / L1
        w = float(weight[i]) if weighted else 1.0
        total += float(row_scale[i]) * (-w * g + beta * w * K)
        pieces.append((g, K))
    return total, pieces
