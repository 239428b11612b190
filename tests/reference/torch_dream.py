"""Plain-Python re-statement of Dream's `diffusion_generate` (models_decoders.md §6.2) driving a `transformers` Qwen2
model, with every random draw recorded so the JAX loop can replay it (§8.4).

Written from the spec's pseudo-code, never from dlmjax. The model runs with the additive 4-D mask valid_i ∧ valid_j
and `tok_idx` positions when the batch has padding (§3.4), the logits are shifted right by one (§1.6) and
`sample_tokens` runs in the model's dtype. Two deliberate re-statements:
* top-k selections use a stable descending sort (ties to the lower index: the spec's choice N7), not torch.topk,
  whose tie order is unspecified;
* alg_temp > 0 draws k slots without replacement from softmax(C / alg_temp) as Gumbel-top-k (the same distribution
  as torch.multinomial without replacement), so the Gumbel noise can be recorded and replayed.
The 'tau_budget' and 'dynamic' rules follow the SLIM-RL Dream port's per-row branch (slimrl_tracerl.md §0.3): the
row's own schedule count int(n_row · float(1 - s/t)) is the floor, all remaining masks at the last step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tests.reference import hf_models as R


def top_p_logits(logits, top_p):
    """Nucleus filter: sort descending, cumulative softmax, remove where cum > top_p shifted right by one."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k):
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature, top_p, top_k, alg, gen):
    """Dream `sample_tokens` on [N, V] logits in their dtype. Returns (confidence, x0, p(x0))."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs.float(), 1, generator=gen)[:, 0]
        p = probs.gather(-1, x0[:, None])[:, 0]
    else:
        p, x0 = probs.max(dim=-1)
    conf = p
    if alg == "topk_margin":
        sp = torch.sort(probs, dim=-1, descending=True)[0]
        conf = sp[:, 0] - sp[:, 1]
    elif alg == "entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0, p


def stable_topk(values, k):
    """Indices of the k largest entries of a 1-D tensor, ties to the lower index."""
    return torch.sort(values.float(), descending=True, stable=True)[1][:k]


def diffusion_generate(model, input_ids, attention_mask=None, *, max_new, steps, mask_id, eps=1e-3, alg="origin",
                       alg_temp=None, temperature=0.0, top_p=None, top_k=None, rule="schedule", tau=0.9, m=1.0,
                       forbid_mask=False, seed=0):
    """input_ids [B, P] (left-padded), attention_mask [B, P] bool or None. Returns dict(tokens [B, G], step_map
    [B, G] (1-based step at which the slot last turned from mask to token), conf [B, G] (p of that token), k (per-step
    batch counts of the schedule rule), surplus (how many top-k picks fell on non-masked slots: rows holding fewer
    masks than k; torch.topk's choice among those -inf ties is undefined, so such runs are not comparable),
    draws {tokens, uniforms, gumbel} each [B, steps, G], canvas [B, P+G])."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    b, p = ids.shape
    g = max_new
    dtype = next(model.parameters()).dtype
    x = F.pad(ids, (0, g), value=mask_id)
    if attention_mask is not None and not np.all(attention_mask):
        valid = np.concatenate([np.asarray(attention_mask, bool), np.ones((b, g), bool)], axis=1)
        add_mask = R.additive(R.dream_allowed(valid), dtype)
        pos = torch.from_numpy(R.dream_position_ids(valid))
    else:  # the reference passes "full" (no mask) and default positions
        add_mask = R.additive(np.ones((b, p + g, p + g), bool), dtype)
        pos = torch.arange(p + g)[None].expand(b, -1)
    timesteps = torch.linspace(1, eps, steps + 1)
    draws = dict(tokens=np.zeros((b, steps, g), np.int32), uniforms=np.zeros((b, steps, g), np.float32),
                 gumbel=np.zeros((b, steps, g), np.float32))
    step_map = np.zeros((b, g), np.int64)
    conf_map = np.zeros((b, g), np.float64)
    ks, surplus = [], 0
    for i in range(steps):
        mask_index = x == mask_id
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=add_mask, position_ids=pos).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if forbid_mask:
            logits[..., mask_id] = float("-inf")
        mask_logits = logits[mask_index]
        rows, cols = mask_index.nonzero(as_tuple=True)  # row-major, the order of boolean indexing
        rn, gn = rows.numpy(), cols.numpy() - p
        t, s = timesteps[i], timesteps[i + 1]
        prev = x.clone()
        p_new = torch.zeros(x.shape, dtype=torch.float64)  # p(x0) at every written slot
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full((len(rows),), mask_id, dtype=torch.long)
            u = torch.rand(x0.shape, generator=gen)
            draws["uniforms"][rn, i, gn] = u.numpy()
            tr = u < p_transfer
            if tr.any():
                _, xs, ps = sample_tokens(mask_logits[tr], temperature, top_p, top_k, alg, gen)
                x0[tr] = xs
                trn = tr.numpy()
                draws["tokens"][rn[trn], i, gn[trn]] = xs.numpy()
                p_new[rows[tr], cols[tr]] = ps.double()
            x[mask_index] = x0
        else:
            conf, x0, ps = sample_tokens(mask_logits, temperature, top_p, top_k, alg, gen)
            draws["tokens"][rn, i, gn] = x0.numpy()
            p_new[rows, cols] = ps.double()
            full = torch.full(x.shape, float("-inf"), dtype=conf.dtype)
            full[mask_index] = conf
            cand = torch.full_like(x, mask_id)
            cand[mask_index] = x0
            if rule == "schedule":
                num_mask_token = mask_index.sum() / b
                k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
                ks.append(k)
                surplus += int(np.maximum(k - mask_index.sum(1).numpy(), 0).sum())
                if k > 0:
                    if alg_temp is None or alg_temp == 0:
                        idx = [stable_topk(full[j], k) for j in range(b)]
                    else:
                        gum = -torch.log(-torch.log(torch.rand(x.shape, generator=gen)))
                        draws["gumbel"][:, i] = gum[:, p:].numpy()
                        scores = torch.where(mask_index, full.float() / alg_temp + gum, float("-inf"))
                        idx = [stable_topk(scores[j], k) for j in range(b)]
                    for j in range(b):
                        x[j, idx[j]] = cand[j, idx[j]]
            else:
                sel = _row_rule(rule, full, mask_index, i, steps, float(1.0 - s / t), tau, m)
                x[sel] = cand[sel]
        now, was = x[:, p:] == mask_id, prev[:, p:] == mask_id
        unmasked = (was & ~now).numpy()
        step_map[unmasked] = i + 1
        conf_map[unmasked] = p_new[:, p:].numpy()[unmasked]
        step_map[(~was & now).numpy()] = 0
        conf_map[(~was & now).numpy()] = 0.0
    return dict(tokens=x[:, p:].numpy(), step_map=step_map, conf=conf_map, k=ks, surplus=surplus, draws=draws,
                canvas=x.numpy())


def _row_rule(rule, full, mask_index, i, steps, frac, tau, m):
    """SLIM-RL Dream port's per-row branch: floor base_k = int(n_masked · frac) (n_masked at the last step);
    tau_budget: k = min(max(k_budget, base_k), n_masked) over candidates c > τ sorted descending, cumulative 1 - c
    ≤ m_eff·(1 - τ); dynamic (TraceRL): all c > τ, or the top base_k when fewer pass."""
    b = full.shape[0]
    is_last = i == steps - 1
    sel = torch.zeros_like(mask_index)
    for j in range(b):
        n_masked = int(mask_index[j].sum())
        if n_masked == 0:
            continue
        c = full[j]
        base_k = n_masked if is_last else int(n_masked * frac)
        if rule == "tau_budget":
            if is_last:
                k = n_masked
            else:
                budget = (m if m > 0 else base_k) * (1.0 - tau)
                above = c[c > tau]
                k_budget = 0
                if above.numel() > 0:
                    sc = torch.sort(above, descending=True)[0]
                    k_budget = int((torch.cumsum(1.0 - sc, dim=0) <= budget).sum())
                k = min(max(k_budget, base_k), n_masked)
            sel[j, stable_topk(c, k)] = True
        elif rule == "dynamic":
            above = (c > tau) & mask_index[j]
            if int(above.sum()) < base_k:
                above[stable_topk(c, base_k)] = True
            sel[j] = above
        else:
            raise ValueError(rule)
    return sel & mask_index
