"""Plain-Python re-statements of the reference decoding loops, driving a `transformers` model one row at a time.

Written from the spec (slimrl_tracerl.md §0.2, models_decoders.md §6.3), never from dlmjax. The SDAR loop runs the
model without a cache on the committed prefix + the current block under the block-causal mask; that equals the
cached reference because SDAR's cache is exact (spec §4.4).
"""

from __future__ import annotations

import numpy as np
import torch

from tests.reference import hf_models as R
from tests.reference import np_rules as NR


def _filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """SDAR/jetengine sampler: ℓ/T, top-k (values below the k-th largest -> -inf), top-p (shifted removal), softmax,
    float32 throughout. logits: [K, V] float32."""
    x = logits.astype(np.float32)
    if temperature != 1.0:
        x = x / np.float32(temperature)
    if top_k and top_k > 0:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        srt = np.take_along_axis(x, order, -1)
        p = np.exp(srt - srt.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        remove = np.cumsum(p, -1) > top_p
        remove[:, 1:] = remove[:, :-1].copy()
        remove[:, 0] = False
        rm = np.zeros_like(remove)
        np.put_along_axis(rm, order, remove, -1)
        x = np.where(rm, -np.inf, x)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def sdar_block_decode(model, prompt, *, block, steps, max_new, rule, tau=0.9, m=1.0, greedy=True, temperature=1.0,
                      top_k=0, top_p=1.0, mask_id, stop_ids=(), forbid_mask=False, seed=0, nlc_budget=1.0,
                      eb_threshold=0.35):
    """One prompt. Returns dict(tokens (completion, cut after the first stop id / max_new), step_map, n_denoise,
    n_save, sampled (list of [K] candidate arrays per denoising step, to replay))."""
    gen = torch.Generator().manual_seed(seed)
    lp = len(prompt)
    total = -(-(lp + max_new) // block) * block
    x = np.full(total, mask_id, np.int64)
    x[:lp] = prompt
    step_map = np.zeros(total, np.int64)
    sched = [block // steps + (i < block % steps) for i in range(steps)]
    n_denoise = n_save = 0
    sampled = []
    blk = lp // block
    while True:
        start, end = blk * block, (blk + 1) * block
        for step in range(steps + 1):
            masked = x[start:end] == mask_id
            if not masked.any() or step == steps:
                n_save += 1  # the forward that writes the finished block's K/V (no logits used)
                break
            seq = x[:end][None]
            allowed = R.block_causal_allowed(np.ones((1, end), bool), block)
            logits = R.hf_logits(model, seq, allowed)[0, start:end]  # [K, V]
            n_denoise += 1
            if forbid_mask:
                logits[:, mask_id] = -np.inf
            if greedy:
                x0 = logits.argmax(-1)
                p = NR.softmax(logits, np.float32)
            else:
                p = _filtered_probs(logits, temperature, top_k, top_p)
                x0 = torch.multinomial(torch.from_numpy(p), 1, generator=gen)[:, 0].numpy()
            sampled.append(x0.copy())
            conf = np.where(masked, p[np.arange(block), x0], -np.inf).astype(np.float32)[None]
            n = np.array([sched[step]])
            if rule == "static":
                sel = NR.top_n(conf, masked[None], n)
            elif rule == "dynamic":
                sel = NR.dynamic_threshold(conf, masked[None], n, tau)
            elif rule == "tau_budget":
                sel = NR.tau_budget(conf, masked[None], n, tau, m=m)
            elif rule == "contiguous_dynamic":
                sel = NR.contiguous_dynamic(conf, masked[None], n, tau)
            elif rule == "nlc_bounded_dynamic":
                sel = NR.nlc_bounded_dynamic(conf, masked[None], n, nlc_budget)
            elif rule == "gc_dynamic":
                sel = NR.gc_dynamic(conf, masked[None], np.array([steps - step]), tau)
            elif rule == "entropy_bounded":  # entropy of the (filtered) distribution each slot samples from
                ent = NR.clamped_entropy(p.astype(np.float32)).astype(np.float32)[None]
                sel = NR.entropy_bounded(ent, masked[None], eb_threshold)
            else:
                sel = NR.sequential(masked[None], n)
            sel = sel[0] & masked
            x[start:end][sel] = x0[sel]
            step_map[start:end][sel] = n_denoise
        comp = x[lp:end]
        if any(t in stop_ids for t in comp) or end >= lp + max_new:
            break
        blk += 1
    comp = x[lp:lp + max_new]
    sm = step_map[lp:lp + max_new]
    cut = max_new
    for i, t in enumerate(comp):
        if t in stop_ids:
            cut = i + 1
            break
    return dict(tokens=comp[:cut], step_map=sm[:cut], n_denoise=n_denoise, n_save=n_save, sampled=sampled)


def _llada_cached_logits(model, x, val, a, e, mode, pkv0):
    """Fast-dLLM v1 cached step with a transformers DynamicCache (spec §6.4.2). prefix: the step-0 cache cropped to
    [0, a), fed x[a:]; dual: the step-0 cache without the block's slots, fed the block (bidirectional attention is
    invariant to the order of keys, so the block's fresh K/V may sit at the end of the cache)."""
    import copy

    c = copy.deepcopy(pkv0)
    n = len(x)
    if mode == "prefix":
        c.crop(a - n)
        q, keys_valid = x[a:], val
    else:
        for layer in c.layers:
            layer.keys = torch.cat([layer.keys[:, :, :a], layer.keys[:, :, e:]], dim=2)
            layer.values = torch.cat([layer.values[:, :, :a], layer.values[:, :, e:]], dim=2)
        q, keys_valid = x[a:e], np.concatenate([val[:a], val[e:], val[a:e]])
    allowed = np.broadcast_to(keys_valid[None, None, :], (1, len(q), n))
    pos = torch.arange(a, a + len(q))[None]
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(q[None]), attention_mask=R.additive(allowed), position_ids=pos,
                    past_key_values=c, use_cache=True)
    return out.logits[0, :e - a].float().numpy()


def llada_generate(model, prompt, valid, *, gen, block, steps, rule, mask_id, tau=0.9, m=1.0, factor=1.0,
                   temperature=0.0, conf_dtype=np.float32, uniforms=None, cache="none", cfg_scale=0.0):
    """LLaDA generate (spec §6.1) for one left-padded row; rules of §6.4.1 and the SLIM-RL port (§0.3); Fast-dLLM's
    prefix / dual cache (§6.4.2) refreshed by the full forward at each block's first step.

    uniforms: per-step noise (float64 [block, V] Gumbel uniforms, or float32 [block] for random remasking).
    Returns dict(tokens [gen], step_map [gen], n_forward)."""
    lp = len(prompt)
    x = np.concatenate([np.asarray(prompt, np.int64), np.full(gen, mask_id, np.int64)])
    val = np.concatenate([np.asarray(valid, bool), np.ones(gen, bool)])
    step_map = np.zeros(lp + gen, np.int64)
    s = steps // (gen // block)
    t = 0
    for k in range(gen // block):
        a, e = lp + k * block, lp + (k + 1) * block
        r = int((x[a:e] == mask_id).sum())
        i = 0
        max_steps = s if rule in ("low_confidence", "random") else block
        while (x[a:e] == mask_id).any() and i < max_steps:
            if cfg_scale > 0:  # guidance: unconditional = the prompt index P (frozen at start, pads included) masked
                un_x = x.copy()
                un_x[:lp] = mask_id
                both = R.hf_logits(model, np.stack([x, un_x]), R.llada_allowed(np.stack([val, val])))[:, a:e]
                c, u = both[0].astype(np.float32), both[1].astype(np.float32)
                logits = (u + np.float32(cfg_scale + 1) * (c - u)).astype(np.float64)
            elif cache == "none":
                logits = R.hf_logits(model, x[None], R.llada_allowed(val[None]))[0, a:e].astype(np.float64)
            elif i == 0:
                with torch.no_grad():
                    out = model(input_ids=torch.from_numpy(x[None]), attention_mask=R.additive(R.llada_allowed(
                        val[None])), position_ids=torch.arange(len(x))[None], use_cache=True)
                pkv0 = out.past_key_values
                logits = out.logits[0, a:e].float().numpy().astype(np.float64)
            else:
                logits = _llada_cached_logits(model, x, val, a, e, cache, pkv0).astype(np.float64)
            if temperature > 0:
                score = np.exp(logits) / (-np.log(uniforms[t])) ** temperature
                x0 = score.argmax(-1)
            else:
                x0 = logits.argmax(-1)
            masked = (x[a:e] == mask_id)[None]
            n = np.array([r // s + (min(i, s - 1) < r % s)])
            if rule == "random":
                conf = np.asarray(uniforms[t], np.float32)[None]
                sel = NR.top_n(conf, masked, n)
            else:
                p = NR.softmax(logits.astype(conf_dtype), conf_dtype)
                conf = np.where(masked[0], p[np.arange(block), x0], -np.inf).astype(conf_dtype)[None]
                if rule == "low_confidence":
                    sel = NR.top_n(conf, masked, n)
                elif rule == "fast_dllm_threshold":
                    sel = NR.fast_dllm_threshold(conf, masked, tau)
                elif rule == "fast_dllm_factor":
                    sel = NR.fast_dllm_factor(conf, masked, factor)
                else:
                    sel = NR.tau_budget(conf, masked, n, tau, m=m)
            sel = sel[0] & masked[0]
            t += 1
            x[a:e][sel] = x0[sel]
            step_map[a:e][sel] = t
            i += 1
    return dict(tokens=x[lp:], step_map=step_map[lp:], n_forward=t)
