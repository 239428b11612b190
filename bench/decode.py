#!/usr/bin/env python
"""Decoder benchmarks (issue 4 §5): loop overhead, ours vs a PyTorch loop, KV-cache scaling, batch scaling, TPF.

Models. One run builds two random-weight `transformers` models of the SmolLM2-135M geometry (hidden 576, 30 layers,
9 / 3 heads of 64, MLP 1536, vocab 49152, rope_theta 1e5, embeddings untied; `--tiny`: 2 layers, hidden 64, vocab 512)
and imports each with `dlmjax.checkpoint.import_hf`, so both frameworks run exactly the same f32 weights:
  SDAR   `Qwen3ForCausalLM` (q/k RMSNorm), `save_pretrained`, config.json relabelled `model_type: sdar` with
         `block_size` and `mask_token_id` (= vocab - 1) -> dlmjax family "sdar";
  LLaDA  `LlamaForCausalLM`, state dict renamed to LLaDA's keys + a LLaDA config.json
         (tests/reference/hf_models.py) -> dlmjax family "llada" (bidirectional).
A random model is nearly uniform over 49152 tokens, so the final RMSNorm weight is set to `--sharpen` (same weights
on both sides): logits scale by that factor and confidences spread over (0, 1), so thresholds matter and TPF > 1.
All decoding is greedy (argmax candidates, confidence = softmax(logits)[argmax] in f32) with the mask token
forbidden, prompts are random tokens of equal length, no stop ids: every row generates exactly G tokens.

"Ours" is always `dlmjax.decode.api.generate` (the call the decode job, eval and RL rollouts make: the prompt
convention conversion, the loop and the Rollout record in one jit); "iterations" = the SDAR loop's while-loop
iterations = the largest per-row `Rollout.n_forwards` (`loop_iterations`).

Sections (`--sections`, comma-separated; default all):
  overhead  ours: whole `generate` (SDAR `block_generate`) wall time / the same forwards run bare: block_generate's prefill (jitted
            `M.forward` on [B, floor(P/K)*K] writing the cache, logits unused as in the loop) + `iterations` x one
            loop forward (jitted `M.forward` on [B, K] block tokens against a KV cache of the loop's Lmax with a
            per-row cache index, the cache donated, returned and passed to the next call), timed in pairs with the
            decode. One forward and the prefill are also timed alone (wall / (iterations x 1 fwd + prefill)).
  torch     tokens/s of ours vs a plain PyTorch loop, same weights, same batch, same run (interleaved reps), for
            SDAR tau-budget, SDAR dynamic and LLaDA low-confidence. Both sides' tokens are asserted equal first.
              ours   SDAR: `generate` -> `dlmjax.decode.sdar.block_generate` (one jit: prefill + while_loop over per-row blocks,
                     one [B, K] forward per iteration against a fixed-size KV cache, logits only for the block).
                     LLaDA: `generate` -> `dlmjax.decode.llada.generate` (one jit; each step = full-canvas trunk, LM head on the
                     block only).
              torch  SDAR: `transformers` KV cache (DynamicCache), batch in lock step block by block: prefill of the
                     full prompt blocks under the block-causal 4-D mask; each denoising step runs the [B, K] block
                     against the cache (all-visible 4-D mask), then `cache.crop(-K)` drops the block's K/V; when no
                     row has a mask left (or S steps), one saving forward appends the finished block. Rows that
                     finished their block early ride along (their logits are unused). LLaDA: as the reference, the
                     whole canvas every step, no cache, all logits. Both: argmax, f32 softmax, the commit rule from
                     tests/reference/np_rules.py (the NumPy re-statements the decoder tests check against) on [B, K].
                     `torch.inference_mode()`, attn_implementation="sdpa".
            ratio = ours tokens/s / torch tokens/s (> 1: ours faster). "fwd" columns: forwards run (torch's lock
            step may run more than ours' per-row loop); "model %": share of torch's wall time spent inside model().
  cache     ours: time per forward and per block ((S + 1) forwards) at prompt (prefix) lengths P (default 256, 1024,
            4096), measured on the jitted loop forward against a cache of Lmax = P + 2K slots; torch: one
            DynamicCache step ([B, K] against P cached tokens, then crop) at the same P. Optionally
            (`--cache-decode-max`) a real `block_generate` per P: (wall - prefill) / blocks.
  layers    ours only: one loop forward with stacked layers under lax.scan vs unstacked layers in an unrolled loop
            (per-layer cache), f32 and bf16, at the torch-section batch sizes and the cache-section prefixes.
  batch     ours: `block_generate` tokens/s and ms per loop iteration for B = 1 ... 32, with the overhead ratio.
  quality   TPF and expected wrong commits (sum of 1 - p over commits) of static / dynamic / tau-budget on the
            random-weight SDAR model (a sanity table; real quality is measured after training).
  profile   where one iteration's time goes (each piece jitted alone, [B, K, V] logits): forward + cache write,
            forward with the cache read-only, LM head, greedy sampler + rule, top-p sampler + rule, the per-row
            (vmapped dynamic_update_slice) cache write vs a scalar-index write.

  .venv/bin/python bench/decode.py --quick --tiny                 # smoke run (seconds)
  .venv/bin/python bench/decode.py --sections overhead,torch --reps 3 --out /tmp/decode.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bench.common import block, csv_list, machine_info, markdown_table, timed, write_llada_hf  # noqa: E402
from bench.forward import SMOLLM2_135M, TINY  # noqa: E402

SECTIONS = ("overhead", "torch", "cache", "layers", "batch", "quality", "profile")
DEFAULT_SHARPEN = {"SmolLM2-135M": 20.0, "tiny": 48.0}


_ints = csv_list(int)
_floats = csv_list(float)
_sections = csv_list(str, SECTIONS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=_sections, default=list(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="smoke sizes, 1 rep (explicit flags still win)")
    p.add_argument("--tiny", action="store_true", help="tiny geometry (2 layers, hidden 64, vocab 512)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per row after the first (default 2; quick 1)")
    p.add_argument("--block-size", type=int, default=4, help="SDAR block size K (default 4)")
    p.add_argument("--steps", type=int, default=None, help="SDAR denoising steps per block S (default K)")
    p.add_argument("--tau", type=float, default=0.9, help="threshold of dynamic / tau-budget (default 0.9)")
    p.add_argument("--budget-m", type=float, default=1.0, help="tau-budget m (default 1)")
    p.add_argument("--prompt-len", type=int, default=None, help="overhead/torch prompt length P (default 32)")
    p.add_argument("--gen", type=int, default=None, help="overhead/torch SDAR tokens per row G (default 16)")
    p.add_argument("--batch", type=_ints, default=None, help="overhead batch sizes (default 1,16)")
    p.add_argument("--torch-batch", type=_ints, default=None, help="torch-section batch sizes (default 1,4)")
    p.add_argument("--llada-gen", type=int, default=None, help="LLaDA gen_length (default 16)")
    p.add_argument("--llada-block", type=int, default=None, help="LLaDA block_length (default 8)")
    p.add_argument("--llada-steps", type=int, default=None, help="LLaDA steps (default = gen: one token per step)")
    p.add_argument("--cache-lengths", type=_ints, default=None, help="cache-section prefix lengths (256,1024,4096)")
    p.add_argument("--cache-decode-max", type=int, default=None,
                   help="also run a real block_generate for prefix lengths up to this (default 1024; quick: 0 = none)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="batch-section sizes (default 1,2,4,8,16,32)")
    p.add_argument("--batch-gen", type=int, default=None, help="batch-section tokens per row (default 8)")
    p.add_argument("--batch-prompt-len", type=int, default=None, help="batch-section prompt length (default 16)")
    p.add_argument("--quality-batch", type=int, default=None, help="quality-section rows (default 8)")
    p.add_argument("--quality-gen", type=int, default=None, help="quality-section tokens per row (default 32)")
    p.add_argument("--taus", type=_floats, default=None, help="quality-section thresholds (default 0.9,0.7)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="top-p of the sampled overhead rows and of the profile's sampled path (default 0.95)")
    p.add_argument("--sampled-rows", action=argparse.BooleanOptionalAction, default=None,
                   help="overhead: also a sampled (T=1, top-p) decode per batch size (default on; quick: off)")
    p.add_argument("--sharpen", type=float, default=None,
                   help="final-norm weight (logit scale) of the random models (default 20; tiny 48)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's)")
    p.add_argument("--no-assert", action="store_true",
                   help="report token agreement instead of failing when ours and torch differ")
    p.add_argument("--layer-loop", choices=("scan", "unrolled"), default="unrolled",
                   help="ours: stacked layers under lax.scan, or unstacked params + per-layer cache in an unrolled "
                        "loop (default unrolled: what the decode job's --layer_loop=auto runs on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the tables (markdown; JSON if the name ends in .json)")
    a = p.parse_args(argv)
    q = a.quick  # quick: one shape everywhere, so the sections share compilations (the smoke test stays fast)
    a.reps = a.reps if a.reps is not None else (1 if q else 2)
    a.sampled_rows = a.sampled_rows if a.sampled_rows is not None else not q
    a.steps = a.steps or a.block_size
    k = a.block_size
    a.prompt_len = a.prompt_len or (2 * k if q else 32)
    a.gen = a.gen or (2 * k if q else 16)
    a.batch = a.batch or ([1] if q else [1, 16])
    a.torch_batch = a.torch_batch or ([1] if q else [1, 4])
    a.llada_gen = a.llada_gen or (2 * k if q else 16)
    a.llada_block = a.llada_block or (k if q else 8)
    a.llada_steps = a.llada_steps or a.llada_gen
    a.cache_lengths = a.cache_lengths or ([a.prompt_len] if q else [256, 1024, 4096])
    a.cache_decode_max = a.cache_decode_max if a.cache_decode_max is not None else (0 if q else 1024)
    a.batch_sizes = a.batch_sizes or ([1] if q else [1, 2, 4, 8, 16, 32])
    a.batch_gen = a.batch_gen or (a.gen if q else 2 * k)
    a.batch_prompt_len = a.batch_prompt_len or (a.prompt_len if q else 16)
    a.quality_batch = a.quality_batch or (1 if q else 8)
    a.quality_gen = a.quality_gen or (a.gen if q else 32)
    a.taus = a.taus or ([a.tau] if q else [0.9, 0.7])
    return a


# ----------------------------------------------------------------------------------------------------------------
# models: one random HF model per family, imported into dlmjax


def _hf_geometry(geometry: dict) -> dict:
    """transformers config kwargs; embeddings untied (a tied random model predicts its input token: the mask token
    at every masked slot), so the LM head is its own [V, D] matrix (same FLOPs as tied)."""
    g = {k: v for k, v in geometry.items() if k not in ("rope_theta", "pad_token_id")}
    g["tie_word_embeddings"] = False
    g["rope_parameters"] = {"rope_type": "default", "rope_theta": geometry["rope_theta"]}
    return g


def build_models(geometry: dict, work: str, seed: int, sharpen: float, block_size: int):
    """{'sdar': (torch Qwen3, cfg, params), 'llada': (torch Llama, cfg, params)} holding the same f32 weights."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from dlmjax.checkpoint import import_hf, load_checkpoint

    transformers.utils.logging.disable_progress_bar()
    mask_id = geometry["vocab_size"] - 1
    out = {}

    torch.manual_seed(seed)
    qm = Qwen3ForCausalLM(Qwen3Config(**_hf_geometry(geometry), attn_implementation="sdpa")).eval()
    with torch.no_grad():
        qm.model.norm.weight.fill_(sharpen)
    hf = os.path.join(work, "sdar_hf")
    qm.save_pretrained(hf)
    with open(os.path.join(hf, "config.json")) as f:
        raw = json.load(f)
    raw.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=block_size, mask_token_id=mask_id)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    import_hf(hf, os.path.join(work, "sdar"))
    cfg, params = load_checkpoint(os.path.join(work, "sdar"))
    assert cfg.family == "sdar" and cfg.mask_token_id == mask_id
    out["sdar"] = (qm, cfg, params)

    torch.manual_seed(seed + 1)
    lcfg = LlamaConfig(**_hf_geometry(geometry), attn_implementation="sdpa")
    lm = LlamaForCausalLM(lcfg).eval()
    with torch.no_grad():
        lm.model.norm.weight.fill_(sharpen)
    sd = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    hf = os.path.join(work, "llada_hf")
    write_llada_hf(hf, sd, lcfg, geometry, mask_id, tie=False)
    import_hf(hf, os.path.join(work, "llada"))
    cfg, params = load_checkpoint(os.path.join(work, "llada"))
    assert cfg.family == "llada" and cfg.mask_token_id == mask_id
    out["llada"] = (lm, cfg, params)
    return out


def random_prompts(rng, b: int, p: int, vocab: int) -> np.ndarray:
    return rng.integers(1, vocab - 1, (b, p), dtype=np.int32)  # never the mask token (vocab - 1)


# ----------------------------------------------------------------------------------------------------------------
# the PyTorch loops


def _torch_rule(rule: str, conf, masked, n, tau: float, m: float):
    from tests.reference import np_rules as NR

    if rule == "static" or rule == "low_confidence":
        return NR.top_n(conf, masked, n)
    if rule == "dynamic":
        return NR.dynamic_threshold(conf, masked, n, tau)
    if rule == "tau_budget":
        return NR.tau_budget(conf, masked, n, tau, m=m)
    raise ValueError(rule)


def _greedy_conf(logits, mask_id: int):
    """argmax (mask token forbidden) and its f32 softmax probability. logits [B, K, V] -> numpy x0, conf."""
    import torch

    x = logits.float()
    x[..., mask_id] = -torch.inf
    x0 = x.argmax(-1)
    p = torch.softmax(x, -1).gather(-1, x0[..., None])[..., 0]
    return x0, p.numpy()


def torch_sdar_decode(model, prompts: np.ndarray, *, block: int, steps: int, gen: int, rule: str, tau: float,
                      m: float, mask_id: int) -> dict:
    """Batched SDAR block decoding with a transformers DynamicCache, rows in lock step (see the module doc)."""
    import torch
    from transformers import DynamicCache

    b, p = prompts.shape
    k = block
    lmax = -(-(p + gen) // k) * k
    x = torch.full((b, lmax), mask_id, dtype=torch.long)
    x[:, :p] = torch.from_numpy(prompts.astype(np.int64))
    sched = [k // steps + (i < k % steps) for i in range(steps)]
    t_model = 0.0
    n_fwd = 0

    def run(ids, mask, start):
        nonlocal t_model, n_fwd
        pos = torch.arange(start, start + ids.shape[1]).expand(b, -1)
        t0 = time.perf_counter()
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        t_model += time.perf_counter() - t0
        n_fwd += 1
        return o.logits

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        pre = (p // k) * k
        if pre:
            i = torch.arange(pre)
            allowed = (i[None, :] // k) <= (i[:, None] // k)
            run(x[:, :pre], allowed[None, None].expand(b, 1, pre, pre), 0)
        start = pre
        while start < p + gen:
            end = start + k
            see_all = torch.ones((b, 1, k, end), dtype=torch.bool)
            for s in range(steps):
                xb = x[:, start:end]
                masked = (xb == mask_id).numpy()
                active = masked.any(1)
                if not active.any():
                    break
                logits = run(xb, see_all, start)
                cache.crop(-k)  # denoising steps are read-only: drop the block's K/V again
                x0, conf = _greedy_conf(logits, mask_id)
                conf = np.where(masked, conf, -np.inf).astype(np.float32)
                sel = _torch_rule(rule, conf, masked, np.full(b, sched[s]), tau, m) & masked & active[:, None]
                x[:, start:end] = torch.where(torch.from_numpy(sel), x0, xb)
            run(x[:, start:end], see_all, start)  # the saving forward: the finished block's K/V stay
            start = end
    return dict(tokens=x[:, p:p + gen].numpy(), n_forward=n_fwd, t_model=t_model)


def torch_llada_decode(model, prompts: np.ndarray, *, gen: int, block: int, steps: int, mask_id: int) -> dict:
    """LLaDA low-confidence generate as the reference runs it: the whole canvas every step, no cache, all logits."""
    import torch

    b, p = prompts.shape
    length = p + gen
    x = torch.full((b, length), mask_id, dtype=torch.long)
    x[:, :p] = torch.from_numpy(prompts.astype(np.int64))
    see_all = torch.ones((b, 1, length, length), dtype=torch.bool)
    s = steps // (gen // block)
    t_model = 0.0
    n_fwd = 0
    with torch.inference_mode():
        for blk in range(gen // block):
            a, e = p + blk * block, p + (blk + 1) * block
            remaining = (x[:, a:e] == mask_id).sum(1).numpy()
            for i in range(s):
                xb = x[:, a:e]
                masked = (xb == mask_id).numpy()
                active = masked.any(1)
                if not active.any():
                    break
                t0 = time.perf_counter()
                logits = model(input_ids=x, attention_mask=see_all).logits  # [B, L, V], as the reference
                t_model += time.perf_counter() - t0
                n_fwd += 1
                x0, conf = _greedy_conf(logits[:, a:e], mask_id)
                conf = np.where(masked, conf, -np.inf).astype(np.float32)
                n = remaining // s + (i < remaining % s)
                sel = _torch_rule("low_confidence", conf, masked, n, 0.0, 0.0) & masked & active[:, None]
                x[:, a:e] = torch.where(torch.from_numpy(sel), x0, xb)
    return dict(tokens=x[:, p:].numpy(), n_forward=n_fwd, t_model=t_model)


# ----------------------------------------------------------------------------------------------------------------
# ours: the decoders and the bare pieces of one loop iteration


def _jax_fns():
    import jax
    import jax.numpy as jnp

    from dlmjax import model as M
    from dlmjax.decode import rules, sampling

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
    def step(cfg, k, params, cache, xb, start):
        """One loop iteration's forward: [B, K] block at per-row offsets, cache written and returned (donated)."""
        b, lmax = cache["valid"].shape
        idx = start[:, None] + jnp.arange(k, dtype=jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(lmax, dtype=jnp.int32), (b, lmax))
        return M.forward(cfg, params, xb, idx, M.block_causal_mask(idx, slots, k), cache, start)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def step_ro(cfg, k, params, cache, xb, start):
        """The same forward with the cache read-only (logits only; the new cache is dropped)."""
        b, lmax = cache["valid"].shape
        idx = start[:, None] + jnp.arange(k, dtype=jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(lmax, dtype=jnp.int32), (b, lmax))
        return M.forward(cfg, params, xb, idx, M.block_causal_mask(idx, slots, k), cache, start)[0]

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
    def prefill(cfg, k, params, cache, x):
        """block_generate's prefill: full prompt blocks, block-causal, cache written (logits unused -> DCE)."""
        b, lmax = cache["valid"].shape
        slots = jnp.broadcast_to(jnp.arange(lmax, dtype=jnp.int32), (b, lmax))
        pos = slots[:, :x.shape[1]]
        return M.forward(cfg, params, x, pos, M.block_causal_mask(pos, slots, k), cache, 0)[1]

    @functools.partial(jax.jit, static_argnums=(0,))
    def head(cfg, params, h):
        return M.lm_head(cfg, params, h)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
    def sample_rule(logits, rule, tau, top_p, mask_id):
        """sample_sdar (greedy when top_p is None, else T=1 + top-p) + the commit rule, as in one loop iteration."""
        if top_p is None:
            x0, pr = sampling.sample_sdar(logits, dtype=jnp.float32, greedy_decode=True, forbid=mask_id)
        else:
            x0, pr = sampling.sample_sdar(logits, temperature=1.0, top_p=top_p, dtype=jnp.float32,
                                          key=jax.random.key(0), forbid=mask_id)
        masked = jnp.ones(x0.shape, bool)
        if rule == "tau_budget":
            sel = rules.commit_tau_budget(pr, masked, 1, tau)
        else:
            sel = rules.commit_dynamic_threshold(pr, masked, 1, tau)
        return jnp.where(sel, x0, -1)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def write_rows(buf, new, start):
        """The loop's cache write: [NL, B, H, K, D] into [NL, B, H, Lmax, D] at a per-row index (vmapped DUS)."""
        from dlmjax.model import cache as kv

        return kv.write_rows(buf, new, start, axis=3, batch_axis=1)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def write_scalar(buf, new, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, new, start[0], 3)

    return dict(step=step, step_ro=step_ro, prefill=prefill, head=head, sample_rule=sample_rule,
                write_rows=write_rows, write_scalar=write_scalar)


_FNS = {}


def fns():
    if not _FNS:
        _FNS.update(_jax_fns())
    return _FNS


def _median_ms(xs):
    return 1e3 * statistics.median(xs)


def time_calls(fn, reps: int):
    """(first call s, [timed call s], last output) of a zero-argument callable, JAX outputs blocked on."""
    first, out = timed(fn)
    ts = []
    for _ in range(reps):
        del out
        dt, out = timed(fn)
        ts.append(dt)
    return first, ts, out


def time_step(cfg, params, b: int, k: int, lmax: int, start_pos: int, reps: int, read_only: bool = False):
    """Seconds of max(reps, 3) timed loop forwards ([B, K] at start_pos, lmax cache slots, first start_pos valid)."""
    import jax.numpy as jnp

    from dlmjax import model as M

    f = fns()
    cache = M.init_cache(cfg, b, lmax, per_layer=M.is_unstacked(params))
    cache["valid"] = jnp.broadcast_to(jnp.arange(lmax) < start_pos, (b, lmax))
    xb = jnp.full((b, k), cfg.mask_token_id, jnp.int32)
    start = jnp.full((b,), start_pos, jnp.int32)
    state = {"cache": cache}

    def call():
        if read_only:
            return f["step_ro"](cfg, k, params, state["cache"], xb, start)
        logits, state["cache"] = f["step"](cfg, k, params, state["cache"], xb, start)
        return logits

    block(call())
    return [timed(call)[0] for _ in range(max(reps, 3))]


def time_prefill(cfg, params, b: int, k: int, p: int, lmax: int, reps: int):
    import jax.numpy as jnp

    from dlmjax import model as M

    """Seconds of max(reps, 1) timed prefills (block_generate's, alone); [0.0] when the prompt has no full block."""
    pre = (p // k) * k
    if pre == 0:
        return [0.0]
    f = fns()
    x = jnp.ones((b, pre), jnp.int32)
    state = {"cache": M.init_cache(cfg, b, lmax, per_layer=M.is_unstacked(params))}

    def call():
        state["cache"] = f["prefill"](cfg, k, params, state["cache"], x)
        return state["cache"]

    block(call())
    return [timed(call)[0] for _ in range(max(reps, 1))]


def sdar_dc(args, rule: str, gen: int, tau: float | None = None, sampled: bool = False):
    """Greedy (the default of every section), or sampled: temperature 1 + top-p `--top-p` (the overhead rows)."""
    from dlmjax.decode.sdar import BlockDecodeConfig

    kw = dict(greedy=False, temperature=1.0, top_p=args.top_p) if sampled else dict(greedy=True)
    return BlockDecodeConfig(block_size=args.block_size, steps=args.steps, max_new_tokens=gen, rule=rule,
                             tau=args.tau if tau is None else tau, budget_m=args.budget_m, forbid_mask_token=True,
                             **kw)


def ours_sdar_call(cfg, params, dc, prompts: np.ndarray):
    """Zero-argument callable: `decode.api.generate` (the path every user of the decoders takes) on [B, P] prompts
    of equal length -> Rollout."""
    return _ours_call(cfg, params, dc, prompts)


def ours_llada_call(cfg, params, dc, prompts: np.ndarray):
    return _ours_call(cfg, params, dc, prompts)


def _ours_call(cfg, params, dc, prompts: np.ndarray):
    import jax
    import jax.numpy as jnp

    from dlmjax.decode import api

    pr = jnp.asarray(prompts)
    lens = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
    key = jax.random.key(0)
    return lambda: api.generate(dc, cfg, params, pr, lens, key)


def loop_iterations(ro) -> int:
    """The SDAR loop's while-loop iterations from a Rollout: every iteration, each row not yet done runs exactly one
    denoising or one saving forward, and the loop runs until the last row is done, so the count is the largest
    per-row n_forwards."""
    return int(np.max(np.asarray(ro.n_forwards)))


def bare_forwards(cfg, params, b: int, k: int, p: int, lmax: int, iters: int):
    """Zero-argument callable running a decode's forwards as separate jitted calls: block_generate's prefill, then
    `iters` loop forwards ([B, K] against the cache, donated and passed along), blocked on at the end."""
    import jax.numpy as jnp

    from dlmjax import model as M

    f = fns()
    pre = (p // k) * k
    xpre = jnp.ones((b, pre), jnp.int32)
    xb = jnp.full((b, k), cfg.mask_token_id, jnp.int32)
    start = jnp.full((b,), pre, jnp.int32)
    state = {"cache": M.init_cache(cfg, b, lmax, per_layer=M.is_unstacked(params))}

    def call():
        c = state["cache"]
        if pre:
            c = f["prefill"](cfg, k, params, c, xpre)
        logits = None
        for _ in range(iters):
            logits, c = f["step"](cfg, k, params, c, xb, start)
        state["cache"] = c
        return logits, c

    return call


def measure_sdar(args, cfg, params, b: int, p: int, gen: int, rule: str, rng, reps: int,
                 sampled: bool = False) -> dict:
    """Whole decode vs its bare forwards, timed in pairs (decode, then the same forwards as separate jitted calls)
    so that background load hits both alike. Also one forward and the prefill alone (for the columns)."""
    import jax

    k = args.block_size
    prompts = random_prompts(rng, b, p, cfg.vocab_size)
    dc = sdar_dc(args, rule, gen, sampled=sampled)
    decode = ours_sdar_call(cfg, params, dc, prompts)
    first, out = timed(decode)
    out = jax.device_get(out)
    iters = loop_iterations(out)
    lmax = -(-(p + gen) // k) * k
    bare = bare_forwards(cfg, params, b, k, p, lmax, iters)
    block(bare())  # compiles the prefill and the loop forward
    ts, bs = [], []
    for _ in range(reps):
        ts.append(timed(decode)[0])
        bs.append(timed(bare)[0])
    steps = time_step(cfg, params, b, k, lmax, (p // k) * k, reps)
    pres = time_prefill(cfg, params, b, k, p, lmax, reps)
    t_step, t_pre, wall = statistics.median(steps), statistics.median(pres), statistics.median(ts)
    label = f"{rule} T=1 top-p {args.top_p:g}" if sampled else f"{rule} greedy"
    return dict(B=b, P=p, G=gen, rule=label, wall_ms=1e3 * wall, first_s=first, iterations=iters,
                bare_ms=1e3 * statistics.median(bs), step_ms=1e3 * t_step, prefill_ms=1e3 * t_pre,
                ratio=wall / statistics.median(bs), ratio_min=min(ts) / min(bs),
                ratio_est=wall / (iters * t_step + t_pre), iter_ms=1e3 * (wall - t_pre) / max(iters, 1),
                tok_s=b * gen / wall, n_denoise=float(np.mean(out.n_steps)), tpf=float(np.mean(out.tpf)),
                wall_all_ms=[1e3 * t for t in ts], bare_all_ms=[1e3 * t for t in bs])


# ----------------------------------------------------------------------------------------------------------------
# sections


def section_overhead(args, models, rng, log):
    _, cfg, params = models["sdar"]
    rows = []
    for b in args.batch:
        for sampled in ((False, True) if args.sampled_rows else (False,)):
            r = measure_sdar(args, cfg, params, b, args.prompt_len, args.gen, "tau_budget", rng, args.reps, sampled)
            rows.append(r)
            log(f"overhead B={b} {r['rule']}: wall {r['wall_ms']:.0f} ms, bare {r['bare_ms']:.0f} ms "
                f"({r['iterations']} it x {r['step_ms']:.1f} ms + prefill {r['prefill_ms']:.0f} ms) -> ratio "
                f"{r['ratio']:.3f}")
    headers = ["B", "P", "G", "rule", "iterations", "wall ms", "bare fwds ms", "overhead ratio", "ratio (min)",
               "1 fwd ms", "prefill ms", "loop ms/iter", "ratio from 1 fwd", "first call s"]
    body = [[r["B"], r["P"], r["G"], r["rule"], r["iterations"], f"{r['wall_ms']:.0f}", f"{r['bare_ms']:.0f}",
             f"{r['ratio']:.3f}", f"{r['ratio_min']:.3f}", f"{r['step_ms']:.1f}", f"{r['prefill_ms']:.1f}",
             f"{r['iter_ms']:.1f}", f"{r['ratio_est']:.3f}", f"{r['first_s']:.1f}"] for r in rows]
    text = ("### Loop overhead (ours, SDAR tau-budget)\n\nbare fwds = the same prefill + `iterations` loop "
            "forwards run as separate jitted calls (cache donated and passed along), timed in pairs with the "
            "decode; overhead ratio = wall / bare fwds (medians; ratio (min): fastest of each); 1 fwd / prefill = "
            "each alone (medians); loop ms/iter = (wall - prefill) / iterations; ratio from 1 fwd = wall / "
            "(iterations x 1 fwd + prefill); first call = compile + run; target <= 1.10\n\n"
            + markdown_table(headers, body))
    return text, rows


def _interleaved(torch_fn, ours_fn, reps: int):
    t_s, o_s, t_out = [], [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        t_out = torch_fn()
        t_s.append(time.perf_counter() - t0)
        o_s.append(timed(ours_fn)[0])
    return t_s, o_s, t_out


def section_torch(args, models, rng, log):
    import jax

    from dlmjax.decode.llada import LLaDADecodeConfig

    rows = []
    for b in args.torch_batch:
        sdar_prompts = random_prompts(rng, b, args.prompt_len, models["sdar"][1].vocab_size)  # same for both rules
        for name in ("SDAR tau-budget", "SDAR dynamic", "LLaDA low-confidence"):
            if name.startswith("SDAR"):
                tm, cfg, params = models["sdar"]
                rule = "tau_budget" if "tau" in name else "dynamic"
                prompts = sdar_prompts
                dc = sdar_dc(args, rule, args.gen)
                ours_fn = ours_sdar_call(cfg, params, dc, prompts)
                torch_fn = functools.partial(torch_sdar_decode, tm, prompts, block=args.block_size,
                                             steps=args.steps, gen=args.gen, rule=rule, tau=args.tau,
                                             m=args.budget_m, mask_id=cfg.mask_token_id)
                gen = args.gen
            else:
                tm, cfg, params = models["llada"]
                prompts = random_prompts(rng, b, args.prompt_len, cfg.vocab_size)
                dc = LLaDADecodeConfig(gen_length=args.llada_gen, block_length=args.llada_block,
                                       steps=args.llada_steps, rule="low_confidence", forbid_mask_token=True)
                ours_fn = ours_llada_call(cfg, params, dc, prompts)
                torch_fn = functools.partial(torch_llada_decode, tm, prompts, gen=args.llada_gen,
                                             block=args.llada_block, steps=args.llada_steps,
                                             mask_id=cfg.mask_token_id)
                gen = args.llada_gen
            first, o = timed(ours_fn)
            o = jax.device_get(o)
            t_first = time.perf_counter()
            t = torch_fn()
            t_first = time.perf_counter() - t_first
            ours_tok = np.asarray(o.tokens)[:, :gen]
            agree = float(np.mean(ours_tok == t["tokens"]))
            if agree < 1 and not args.no_assert:
                raise AssertionError(f"{name} B={b}: ours and torch tokens differ (agreement {agree:.3f})\n"
                                     f"ours  {ours_tok.tolist()}\ntorch {t['tokens'].tolist()}")
            ours_fwd = loop_iterations(o) + (1 if (args.prompt_len // args.block_size) else 0) \
                if name.startswith("SDAR") else int(np.max(o.n_forwards))
            t_s, o_s, t_last = _interleaved(torch_fn, ours_fn, args.reps)
            t_ms, o_ms = _median_ms(t_s), _median_ms(o_s)
            r = dict(decoder=name, B=b, G=gen, torch_ms=t_ms, ours_ms=o_ms, torch_tok_s=1e3 * b * gen / t_ms,
                     ours_tok_s=1e3 * b * gen / o_ms, ratio=t_ms / o_ms, torch_fwd=t["n_forward"], ours_fwd=ours_fwd,
                     ratio_min=min(t_s) / min(o_s), torch_model_frac=t_last["t_model"] / t_s[-1],
                     agree=agree, ours_first_s=first, torch_first_s=t_first,
                     tpf=float(np.mean(o.tpf)), torch_all_ms=[1e3 * x for x in t_s],
                     ours_all_ms=[1e3 * x for x in o_s])
            rows.append(r)
            log(f"torch {name} B={b}: torch {t_ms:.0f} ms, ours {o_ms:.0f} ms, ratio {r['ratio']:.2f}")
    headers = ["decoder", "B", "G", "torch ms", "ours ms", "torch tok/s", "ours tok/s", "ratio", "ratio (min)",
               "torch fwd", "ours fwd", "torch ms/fwd", "ours ms/fwd", "torch model %", "TPF", "tokens equal"]
    body = [[r["decoder"], r["B"], r["G"], f"{r['torch_ms']:.0f}", f"{r['ours_ms']:.0f}", f"{r['torch_tok_s']:.1f}",
             f"{r['ours_tok_s']:.1f}", f"{r['ratio']:.2f}", f"{r['ratio_min']:.2f}", r["torch_fwd"], r["ours_fwd"],
             f"{r['torch_ms'] / r['torch_fwd']:.0f}", f"{r['ours_ms'] / r['ours_fwd']:.0f}",
             f"{100 * r['torch_model_frac']:.0f}", f"{r['tpf']:.2f}", f"{r['agree']:.3f}"] for r in rows]
    text = ("### Ours vs the PyTorch loop (same weights, same batch, interleaved)\n\nratio = ours tok/s / torch "
            "tok/s from medians (> 1: ours faster; target >= 2), ratio (min) from the fastest calls; fwd = "
            "forwards run (incl. prefill / saving forwards), ms/fwd = wall / fwd; torch model % = share of "
            "torch's wall time inside model(); tokens equal = fraction of identical tokens\n\n"
            + markdown_table(headers, body))
    return text, rows


def torch_cache_step(model, b: int, k: int, prefix: int, reps: int) -> float:
    """Median seconds of one DynamicCache denoising step ([B, K] against `prefix` cached tokens, then crop)."""
    import torch
    from transformers import DynamicCache

    c = model.config
    cache = DynamicCache(config=c)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    with torch.inference_mode():
        for layer in range(c.num_hidden_layers):
            kv = torch.randn(b, c.num_key_value_heads, prefix, hd)
            cache.update(kv, kv.clone(), layer)
        ids = torch.ones((b, k), dtype=torch.long)
        mask = torch.ones((b, 1, k, prefix + k), dtype=torch.bool)
        pos = torch.arange(prefix, prefix + k).expand(b, -1)

        def call():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache.crop(-k)

        call()
        ts = []
        for _ in range(max(reps, 3)):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def section_cache(args, models, rng, log):
    import jax

    tm, cfg, params = models["sdar"]
    k, s = args.block_size, args.steps
    rows = []
    for p in args.cache_lengths:
        gen = 2 * k
        lmax = -(-(p + gen) // k) * k
        t_step = statistics.median(time_step(cfg, params, 1, k, lmax, (p // k) * k, args.reps))
        t_torch = torch_cache_step(tm, 1, k, (p // k) * k, args.reps)
        r = dict(P=p, Lmax=lmax, step_ms=1e3 * t_step, block_ms=1e3 * (s + 1) * t_step, torch_step_ms=1e3 * t_torch,
                 torch_block_ms=1e3 * (s + 1) * t_torch, decode_block_ms=None)
        if p <= args.cache_decode_max:
            dgen = 4 * k
            prompts = random_prompts(rng, 1, p, cfg.vocab_size)
            dc = sdar_dc(args, "static", dgen)
            _, ts, out = time_calls(ours_sdar_call(cfg, params, dc, prompts), args.reps)
            dl = -(-(p + dgen) // k) * k
            t_pre = statistics.median(time_prefill(cfg, params, 1, k, p, dl, args.reps))
            out = jax.device_get(out)
            n_blocks = dl // k - p // k
            r.update(decode_block_ms=1e3 * (statistics.median(ts) - t_pre) / n_blocks, decode_prefill_ms=1e3 * t_pre,
                     decode_iterations=loop_iterations(out))
        rows.append(r)
        log(f"cache P={p}: ours {r['step_ms']:.1f} ms/fwd, torch {r['torch_step_ms']:.1f} ms/fwd")
    base = rows[0]["block_ms"] if rows else 1.0
    headers = ["prefix P", "Lmax", "ours ms/fwd", "ours ms/block", "vs first", "torch ms/fwd", "torch ms/block",
               "ours decode ms/block", "decode prefill ms"]
    body = [[r["P"], r["Lmax"], f"{r['step_ms']:.1f}", f"{r['block_ms']:.0f}", f"{r['block_ms'] / base:.2f}",
             f"{r['torch_step_ms']:.1f}", f"{r['torch_block_ms']:.0f}",
             "-" if r["decode_block_ms"] is None else f"{r['decode_block_ms']:.0f}",
             "-" if r["decode_block_ms"] is None else f"{r['decode_prefill_ms']:.0f}"] for r in rows]
    text = (f"### KV cache: time per block vs prefix length (B=1, K={k}, S={s})\n\nms/block = (S + 1) x one loop "
            "forward (S denoising steps + the saving forward) against a cache holding the prefix; torch = one "
            "DynamicCache step ([B, K] forward appending to the cache, then crop); ours decode ms/block = (real "
            "block_generate wall, static rule, 4 blocks - its prefill) / blocks\n\n" + markdown_table(headers, body))
    return text, rows


def section_layers(args, models, rng, log):
    """The loop forward ([B, K] against the cache) with stacked layers under lax.scan vs unstacked layers in an
    unrolled loop (per-layer cache), in f32 and bf16 (params + compute), interleaved A/B/A/B."""
    import jax
    import jax.numpy as jnp

    from dlmjax import model as M

    _, cfg32, params = models["sdar"]
    stacked = M.stack_layers(params)
    k = args.block_size
    rows = []
    for dt in ("float32", "bfloat16"):
        cfg = cfg32.replace(param_dtype=dt, compute_dtype=dt)
        base = jax.tree.map(lambda w: w.astype(dt), stacked)
        layouts = {"scan": base, "unrolled": M.unstack_layers(base)}
        for b in args.torch_batch:
            for p in args.cache_lengths:
                lmax = -(-(p + 2 * k) // k) * k
                ts = {name: [] for name in layouts}
                for _ in range(2):
                    for name, prm in layouts.items():
                        ts[name] += time_step(cfg, prm, b, k, lmax, (p // k) * k, args.reps)
                r = dict(dtype=dt, B=b, P=p, scan_ms=_median_ms(ts["scan"]), unrolled_ms=_median_ms(ts["unrolled"]))
                rows.append(r)
                log(f"layers {dt} B={b} P={p}: scan {r['scan_ms']:.1f} ms, unrolled {r['unrolled_ms']:.1f} ms")
    first = {(r["dtype"], r["B"]): r for r in reversed(rows)}
    headers = ["dtype", "B", "prefix P", "scan ms/fwd", "unrolled ms/fwd", "scan / unrolled", "scan vs first P",
               "unrolled vs first P"]
    body = [[r["dtype"], r["B"], r["P"], f"{r['scan_ms']:.1f}", f"{r['unrolled_ms']:.1f}",
             f"{r['scan_ms'] / r['unrolled_ms']:.2f}", f"{r['scan_ms'] / first[(r['dtype'], r['B'])]['scan_ms']:.2f}",
             f"{r['unrolled_ms'] / first[(r['dtype'], r['B'])]['unrolled_ms']:.2f}"] for r in rows]
    text = (f"### Layer loop: scan vs unrolled (one loop forward, K={k}, cache of P + 2K slots)\n\nscan = stacked "
            "params under lax.scan, [NL, ...] cache; unrolled = `M.unstack_layers` params and a per-layer cache "
            "(the decode job's --layer_loop=auto on CPU); medians of two interleaved rounds\n\n"
            + markdown_table(headers, body))
    return text, rows


def section_batch(args, models, rng, log):
    _, cfg, params = models["sdar"]
    rows = []
    for b in args.batch_sizes:
        r = measure_sdar(args, cfg, params, b, args.batch_prompt_len, args.batch_gen, "tau_budget", rng, args.reps)
        rows.append(r)
        log(f"batch B={b}: {r['tok_s']:.1f} tok/s, {r['iter_ms']:.1f} ms/iter, ratio {r['ratio']:.3f}")
    base = rows[0]["tok_s"] if rows else 1.0
    headers = ["B", "iterations", "wall ms", "tok/s", "tok/s vs first row", "loop ms/iter", "1 fwd ms",
               "bare fwds ms", "overhead ratio", "ratio (min)"]
    body = [[r["B"], r["iterations"], f"{r['wall_ms']:.0f}", f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}",
             f"{r['iter_ms']:.1f}", f"{r['step_ms']:.1f}", f"{r['bare_ms']:.0f}", f"{r['ratio']:.3f}",
             f"{r['ratio_min']:.3f}"] for r in rows]
    text = (f"### Batch scaling (ours, SDAR tau-budget, greedy, P={args.batch_prompt_len}, G={args.batch_gen})"
            "\n\ntok/s = B x G / wall; overhead ratio as in the loop-overhead table\n\n"
            + markdown_table(headers, body))
    return text, rows


def section_quality(args, models, rng, log):
    import jax

    _, cfg, params = models["sdar"]
    b, gen = args.quality_batch, args.quality_gen
    prompts = random_prompts(rng, b, args.prompt_len, cfg.vocab_size)
    rows = []
    for tau in args.taus:
        for rule in (("dynamic", "tau_budget") if args.quick else ("static", "dynamic", "tau_budget")):
            if rule == "static" and tau != args.taus[0]:
                continue
            dc = sdar_dc(args, rule, gen, tau=tau)
            out = jax.device_get(ours_sdar_call(cfg, params, dc, prompts)())
            comp = np.asarray(out.step_map) > 0
            ewc = np.asarray(out.ewc_sum)
            rows.append(dict(rule=rule, tau=tau if rule != "static" else None, tpf=float(np.mean(out.tpf)),
                             ewc=float(np.mean(ewc)), ewc_tok=float(np.sum(ewc) / max(comp.sum(), 1)),
                             n_denoise=float(np.mean(out.n_steps)), iterations=loop_iterations(out)))
            log(f"quality {rule} tau={tau}: TPF {rows[-1]['tpf']:.2f}, EWC {rows[-1]['ewc']:.2f}")
    headers = ["rule", "tau", "mean TPF", "mean EWC / row", "EWC / token", "denoising fwd / row", "iterations"]
    body = [[r["rule"], "-" if r["tau"] is None else f"{r['tau']:.2f}", f"{r['tpf']:.3f}", f"{r['ewc']:.4f}",
             f"{r['ewc_tok']:.4f}", f"{r['n_denoise']:.2f}", r["iterations"]] for r in rows]
    text = (f"### TPF and expected wrong commits (random-weight SDAR model, B={b}, P={args.prompt_len}, G={gen}, "
            f"K={args.block_size}, S={args.steps}, m={args.budget_m:g}, greedy)\n\nEWC = sum of (1 - p) over the "
            "committed tokens of a row\n\n" + markdown_table(headers, body))
    return text, rows


def section_profile(args, models, rng, log):
    import jax
    import jax.numpy as jnp

    _, cfg, params = models["sdar"]
    f = fns()
    k = args.block_size
    n = max(args.reps, 5)
    rows = []

    def med(fn):
        block(fn())
        return _median_ms([timed(fn)[0] for _ in range(n)])

    for b in args.batch:
        p, gen = args.prompt_len, args.gen
        lmax = -(-(p + gen) // k) * k
        start = (p // k) * k
        r = dict(B=b, Lmax=lmax)
        r["step_ms"] = _median_ms(time_step(cfg, params, b, k, lmax, start, n))
        r["step_ro_ms"] = _median_ms(time_step(cfg, params, b, k, lmax, start, n, read_only=True))
        h = jax.random.normal(jax.random.key(1), (b, k, cfg.hidden_size), jnp.float32)
        r["head_ms"] = med(lambda: f["head"](cfg, params, h))
        logits = block(f["head"](cfg, params, h))
        mid = cfg.mask_token_id
        r["greedy_rule_ms"] = med(lambda: f["sample_rule"](logits, "tau_budget", args.tau, None, mid))
        r["topp_rule_ms"] = med(lambda: f["sample_rule"](logits, "tau_budget", args.tau, args.top_p, mid))
        shape = (cfg.num_layers, b, cfg.num_kv_heads, lmax, cfg.head_dim)
        new = jnp.ones((cfg.num_layers, b, cfg.num_kv_heads, k, cfg.head_dim), jnp.float32)
        st = jnp.full((b,), start, jnp.int32)
        for name, fn in (("write_rows_ms", f["write_rows"]), ("write_scalar_ms", f["write_scalar"])):
            state = {"buf": jnp.zeros(shape, jnp.float32)}

            def call(fn=fn, state=state):
                state["buf"] = fn(state["buf"], new, st)
                return state["buf"]

            r[name] = 2 * med(call)  # k and v
        rows.append(r)
        log(f"profile B={b}: step {r['step_ms']:.1f} ms, read-only {r['step_ro_ms']:.1f} ms, "
            f"greedy+rule {r['greedy_rule_ms']:.2f} ms, top-p+rule {r['topp_rule_ms']:.2f} ms")
    headers = ["B", "Lmax", "fwd + cache write ms", "fwd read-only ms", "LM head ms", "greedy + rule ms",
               f"top-p {args.top_p:g} + rule ms", "per-row K/V write ms", "scalar K/V write ms"]
    body = [[r["B"], r["Lmax"], f"{r['step_ms']:.1f}", f"{r['step_ro_ms']:.1f}", f"{r['head_ms']:.2f}",
             f"{r['greedy_rule_ms']:.2f}", f"{r['topp_rule_ms']:.2f}", f"{r['write_rows_ms']:.2f}",
             f"{r['write_scalar_ms']:.2f}"] for r in rows]
    text = (f"### Profile of one SDAR iteration (ours, K={k}; each piece jitted alone, median of {n})\n\n"
            "fwd + cache write = the loop's forward (donated cache); read-only = same forward, logits only; "
            "K/V writes = both k and v caches [layers, B, Hkv, Lmax, Dh], donated\n\n" + markdown_table(headers, body))
    return text, rows


RUNNERS = {"overhead": section_overhead, "torch": section_torch, "cache": section_cache, "layers": section_layers,
           "batch": section_batch, "quality": section_quality, "profile": section_profile}


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/decode.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    geometry = TINY if args.tiny else SMOLLM2_135M
    gname = "tiny" if args.tiny else "SmolLM2-135M"
    sharpen = args.sharpen if args.sharpen is not None else DEFAULT_SHARPEN[gname]
    info = machine_info()
    t_start = time.perf_counter()

    def log(msg):
        print(f"# [{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    texts, results = [], {}
    with tempfile.TemporaryDirectory(prefix="dlmjax-bench-decode-") as work:
        models = build_models(geometry, work, args.seed, sharpen, args.block_size)
        if args.layer_loop == "unrolled":
            from dlmjax import model as M

            models = {name: (tm, cfg, M.unstack_layers(params)) for name, (tm, cfg, params) in models.items()}
        log(f"built + imported the random {gname} SDAR and LLaDA checkpoints")
        rng = np.random.default_rng(args.seed)
        for sec in args.sections:
            text, rows = RUNNERS[sec](args, models, rng, log)
            texts.append(text)
            results[sec] = rows
    total = time.perf_counter() - t_start
    head = [f"command: `{command.strip()}`",
            f"model: random-weight {gname} geometry (SDAR = Qwen3 layout, LLaDA = Llama layout, untied LM head), "
            f"final-norm weight {sharpen:g}, f32 on both sides; ours with the {args.layer_loop} layer loop; greedy, "
            f"mask token forbidden, K={args.block_size}, S={args.steps}, tau={args.tau:g}, m={args.budget_m:g}, P={args.prompt_len}, SDAR G={args.gen}, "
            f"LLaDA gen {args.llada_gen} block {args.llada_block} steps {args.llada_steps}",
            f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']} on {', '.join(info['jax_devices'])}; "
            f"torch {info.get('torch')} with {torch.get_num_threads()} threads, transformers "
            f"{info.get('transformers')} (sdpa); XLA_FLAGS={info['XLA_FLAGS']!r}; load average (1 min) at the "
            f"start / end: {info['load_avg_1m']:.2f} / {os.getloadavg()[0]:.2f}",
            f"timing: wall-clock medians of {args.reps} timed calls after a first (compiling / warm-up) call; "
            f"torch and ours interleaved in the torch section; whole run {total:.0f} s"]
    text = "\n".join(head) + "\n\n" + "\n\n".join(texts)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump({"command": command.strip(), "machine": info, "args": vars(args), "results": results}, f,
                          indent=2, default=str)
            else:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
