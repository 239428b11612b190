"""Plain-Python re-statement of Fast-dLLM v1's Dream block + cache loop (models_decoders.md §6.4.3, second bullet;
NVlabs/Fast-dLLM @ 24cc59e `dream/model/generation_utils_block.py`, `_sample` with use_cache=True; read, not copied),
driving a `transformers` Qwen2 model made bidirectional by an all-allowed additive mask, with a DynamicCache.
Batch 1 and no padding (the reference recomputes positions as arange and indexes row 0 only).

Written from the spec and the reference's semantics, never from dlmjax. Per block [a, e):
* a full forward of the canvas (positions 0..L-1) fills the cache; logits shifted right by one (position 0 keeps its
  own); a candidate sampled at every position, the one at `a` committed unconditionally;
* `prefix`: the cache cropped to [0, a), fed x[a:] with positions a..L-1; `dual`: the cache of all L positions with
  the block's K/V replaced by fresh ones each forward (fed x[a:e], positions a..e-1; attention is invariant to the
  order of keys, so the block's fresh K/V sit after the others here); `none` (not in the reference): a full forward
  each time, the exact decode the caches approximate. The window's logits are shifted again (window position 0
  keeps its own);
* 'confidence_threshold': C = p(x0) over the block's masks, K = #masks, sorted top-K: the first always, the others
  unless c < τ (a 0-d tensor of the confidence dtype vs a Python float: τ rounded to that dtype, N5);
  otherwise (any other alg): i = 1, 2, ...; at i == S break (after the forward); C = negative entropy,
  k = int(n · (1 - t[i+1]/t[i])) with float32 0-d tensors (int(n) at i = S-1), top-k of C or, with alg_temp, k
  slots drawn by Gumbel-top-k of C / alg_temp (the noise is recorded);
* the loop's "block done" test is at its bottom: one cached forward always runs.
Deliberate re-statements: top-k by a stable descending sort (ties to the lower index, N7) instead of torch.topk;
only the slots the loop uses are sampled (the reference samples the whole window, which only consumes RNG).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from tests.reference import hf_models as R
from tests.reference import torch_dream as TD


def _shift(logits):
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def generate(model, prompt, *, max_new, block, steps, mask_id, cache="prefix", rule="confidence_threshold", tau=0.9,
             eps=1e-3, temperature=0.0, top_p=None, top_k=None, alg_temp=None, conf_dtype=None, forbid_mask=False,
             seed=0):
    """prompt: 1-D token list. Returns dict(tokens [G], step_map [G] (1-based forward that unmasked the slot; full
    and cached forwards counted alike), conf [G] (p of that token), n_forward, draws [n_forward, G] (sampled
    candidates per forward, mask id elsewhere), gumbel [n_forward, G], boundary_ties (threshold: ties at the keep /
    drop boundary; entropy: ties at the k-th pick), tau_edge (kept picks with c in [dtype(τ), τ)),
    multi (cached forwards that committed more than one slot))."""
    gen = torch.Generator().manual_seed(seed)
    p, g = len(prompt), max_new
    n = p + g
    x = torch.tensor([list(prompt) + [mask_id] * g], dtype=torch.long)
    nb = g // block
    assert g % block == 0 and steps % nb == 0
    s_blk = steps // nb
    ts = torch.linspace(1, eps, s_blk + 1)
    step_map = np.zeros(g, np.int64)
    conf_map = np.zeros(g, np.float64)
    draws, gumbels = [], []
    stats = dict(boundary_ties=0, tau_edge=0, multi=0)

    def run(ids, pos, pkv=None):
        allowed = np.ones((1, ids.shape[1], n), bool)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=R.additive(allowed), position_ids=torch.tensor([pos]),
                         past_key_values=pkv, use_cache=True)

    def sample(logits, alg):
        if forbid_mask:
            logits = logits.clone()
            logits[..., mask_id] = float("-inf")
        if conf_dtype is not None:
            logits = logits.to(conf_dtype)
        return TD.sample_tokens(logits, temperature, top_p, top_k, alg, gen)

    def commit(slots, x0, pr):
        """slots: canvas positions; record the forward's commits."""
        for s, t, q in zip(slots, x0, pr):
            x[0, s] = int(t)
            if int(t) != mask_id:
                step_map[s - p] = len(draws)
                conf_map[s - p] = float(q)

    for kb in range(nb):
        a, e = p + kb * block, p + (kb + 1) * block
        full = run(x, list(range(n)))
        pkv0 = full.past_key_values
        logits = _shift(full.logits)
        _, x0, pr = sample(logits[0, a:a + 1], "maskgit_plus")
        draws.append(np.full(g, mask_id, np.int64))
        gumbels.append(np.zeros(g, np.float32))
        draws[-1][a - p] = int(x0[0])
        commit([a], x0, pr)                                              # unconditional
        i = 1
        while True:
            if cache == "prefix":
                c = copy.deepcopy(pkv0)
                c.crop(a - n)
                out = run(x[:, a:], list(range(a, n)), c)
            elif cache == "dual":
                c = copy.deepcopy(pkv0)
                for layer in c.layers:
                    layer.keys = torch.cat([layer.keys[:, :, :a], layer.keys[:, :, e:]], dim=2)
                    layer.values = torch.cat([layer.values[:, :, :a], layer.values[:, :, e:]], dim=2)
                out = run(x[:, a:e], list(range(a, e)), c)
            else:
                out = run(x, list(range(n)))
            lg = out.logits if cache != "none" else out.logits[:, a:]
            wl = _shift(lg)[0, :block]                                  # the block's logits, window shift
            draws.append(np.full(g, mask_id, np.int64))
            gumbels.append(np.zeros(g, np.float32))
            masked = (x[0, a:e] == mask_id).numpy()
            slots = a + np.flatnonzero(masked)
            if rule == "confidence_threshold":
                conf, x0, pr = sample(wl[masked], "maskgit_plus")
                draws[-1][slots - p] = x0.numpy()
                k = len(slots)
                vals, order = torch.sort(conf.float(), descending=True, stable=True)
                keep = [r == 0 or not bool(conf[order[r]] < tau) for r in range(k)]
                stats["tau_edge"] += sum(1 for r in range(1, k) if keep[r] and float(conf[order[r]]) < tau)
                stats["boundary_ties"] += sum(1 for r in range(k - 1) if keep[r] != keep[r + 1]
                                              and bool(vals[r] == vals[r + 1]))
                take = [int(order[r]) for r in range(k) if keep[r]]
            else:
                if i == s_blk:
                    break
                t, s = ts[i], ts[i + 1]
                num = torch.tensor(int(masked.sum())) / 1                  # mask_index.sum() / B, B = 1
                kk = int(num * (1 - s / t)) if i < s_blk - 1 else int(num)
                conf, x0, pr = sample(wl[masked], "entropy")
                draws[-1][slots - p] = x0.numpy()
                score = conf.float()
                if alg_temp:
                    gmb = -torch.log(-torch.log(torch.rand(len(slots), generator=gen)))
                    gumbels[-1][slots - p] = gmb.numpy()
                    score = score / alg_temp + gmb
                vals, order = torch.sort(score, descending=True, stable=True)
                if 0 < kk < len(slots) and bool(vals[kk - 1] == vals[kk]):
                    stats["boundary_ties"] += 1
                take = [int(r) for r in order[:kk]]
                i += 1
            stats["multi"] += len(take) > 1
            commit(slots[take], x0[take], pr[take])
            if not (x[0, a:e] == mask_id).any():
                break
    return dict(tokens=x[0, p:].numpy(), step_map=step_map, conf=conf_map, n_forward=len(draws),
                draws=np.stack(draws), gumbel=np.stack(gumbels), **stats)
