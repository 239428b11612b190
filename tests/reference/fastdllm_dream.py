"""Plain-Python re-statement of Fast-dLLM v1's Dream loop without cache, `alg='confidence_threshold'`
(models_decoders.md §6.4.3; NVlabs/Fast-dLLM @ 24cc59e `dream/model/generation_utils.py`, read, not copied), driving
a `transformers` Qwen2 model made bidirectional by an all-allowed additive mask (the reference's "full" mask).
Batch 1 and no padding, as the reference asserts.

Written from the spec and the reference's semantics, never from dlmjax:
* q = #masks / steps (asserted integral); each iteration K = q + carry; C = p(x0) of the tempered, truncated
  distribution (Dream's `sample_tokens` without margin/entropy) in the confidence dtype, -inf off the masks, over
  the whole canvas (prompt included, as the reference ranks `full_confidence` of the whole row);
* the top K of C: the first is kept; every later pick with `c < τ` (a torch comparison of a 0-d tensor of the
  confidence dtype with a Python float, so τ is rounded to that dtype, N5) is dropped and counted in the carry;
* a drop while the loop is at its last step adds one step (`steps += 1`) and sets q to 0; the check runs per pick, so
  only the first drop of that step extends (after it the step is no longer the last), as in the reference.
One deliberate re-statement: the top-K uses a stable descending sort (ties to the lower index, the spec's N7)
instead of `torch.topk`, whose tie order is unspecified.
`conf_dtype` casts the (float32) logits before sampling: a bf16 model whose logits are those values, rounded.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.reference import hf_models as R
from tests.reference import torch_dream as TD


def generate(model, prompt, *, max_new, steps, mask_id, tau=0.9, temperature=0.0, top_p=None, top_k=None,
             conf_dtype=None, forbid_mask=False, seed=0):
    """prompt: 1-D token list (no padding). Returns dict(tokens [G], step_map [G] (1-based forward that unmasked the
    slot), conf [G] (p of that token), n_forward, k (K per step), dropped (drops per step), draws (sampled tokens
    [n_forward, G]), boundary_ties (steps where a tie at the K-th pick decided a commit), tau_edge (kept picks whose
    confidence lies in [dtype(τ), τ), i.e. kept only because τ is rounded to the confidence dtype), forced (steps
    whose first pick, kept anyway, has c < τ))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([list(prompt) + [mask_id] * max_new], dtype=torch.long)
    p = len(prompt)
    dtype = next(model.parameters()).dtype
    full_mask = R.additive(np.ones((1, p + max_new, p + max_new), bool), dtype)    # the reference's "full"
    pos = torch.arange(p + max_new)[None]
    mask_index = x == mask_id
    n_mask = int(mask_index.sum())
    assert n_mask % steps == 0, "the number of masks must be divisible by steps"
    q = n_mask // steps
    carry = 0
    step_map = np.zeros(max_new, np.int64)
    conf_map = np.zeros(max_new, np.float64)
    ks, drops, draws = [], [], []
    boundary_ties = tau_edge = forced = 0
    i = 0
    while i < steps:
        mask_index = x == mask_id
        with torch.no_grad():                                           # bidirectional: an all-allowed 4-D mask
            logits = model(input_ids=x, attention_mask=full_mask, position_ids=pos).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)      # Dream's shift
        if forbid_mask:
            logits[..., mask_id] = float("-inf")
        mask_logits = logits[mask_index]
        if conf_dtype is not None:
            mask_logits = mask_logits.to(conf_dtype)
        conf, x0, _ = TD.sample_tokens(mask_logits, temperature, top_p, top_k, "maskgit_plus", gen)
        row = torch.full((max_new,), mask_id, dtype=torch.long)
        row[mask_index[0, p:]] = x0
        draws.append(row.numpy())
        cand = torch.full_like(x, mask_id)
        cand[mask_index] = x0
        full = torch.full(x.shape, float("-inf"), dtype=conf.dtype)
        full[mask_index] = conf
        k = q + carry
        carry = 0
        svals, sidx = torch.sort(full[0], descending=True, stable=True)
        vals, idx = svals[:k], sidx[:k]
        take = torch.zeros_like(mask_index)
        take[0, idx[0]] = True                                          # the first pick always
        forced += int(bool(vals[0] < tau))
        n_drop = 0
        for r in range(1, k):
            if vals[r] < tau:                                           # 0-d tensor vs Python float: τ in its dtype
                if i == steps - 1:                                      # dropping at the last step: one step more
                    steps += 1
                    q = 0
                carry += 1
                n_drop += 1
            else:
                take[0, idx[r]] = True
                tau_edge += int(float(vals[r]) < tau)
        # a tie between neighbours in the order of which exactly one is committed: the tie order decides
        kept = [True] + [not bool(v < tau) for v in vals[1:]] + [False] * (len(svals) - k)
        boundary_ties += sum(1 for r in range(len(svals) - 1) if kept[r] != kept[r + 1]
                             and bool(torch.isfinite(svals[r])) and bool(svals[r] == svals[r + 1]))
        ks.append(k)
        drops.append(n_drop)
        prev = x[0, p:] == mask_id
        x[take] = cand[take]
        newly = (prev & (x[0, p:] != mask_id)).numpy()
        step_map[newly] = i + 1
        probs_x0 = torch.zeros(x.shape, dtype=torch.float64)
        probs_x0[mask_index] = conf.double()
        conf_map[newly] = probs_x0[0, p:].numpy()[newly]
        i += 1
    return dict(tokens=x[0, p:].numpy(), step_map=step_map, conf=conf_map, n_forward=i, k=ks, dropped=drops,
                draws=np.stack(draws), boundary_ties=boundary_ties, tau_edge=tau_edge,
                forced=forced)
