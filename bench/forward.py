#!/usr/bin/env python
"""Forward-pass benchmark: dlmjax's jitted forward vs the `transformers` model holding the same weights.

Issue 3 §5. One run, one machine, both frameworks: a random-weight `LlamaForCausalLM` with the SmolLM2-135M geometry
(hidden 576, 30 layers, 9 heads / 3 KV heads of 64, MLP 1536, vocab 49152, tied embeddings, rope_theta 1e5,
rms eps 1e-5) is saved with `save_pretrained`, imported with `dlmjax.checkpoint.import_hf` and loaded with
`load_checkpoint`, so both sides run exactly the same weights (the bf16 rows load the same f32 files cast to bf16 on
both sides: torch `from_pretrained(dtype=bfloat16)`, ours `load_checkpoint(dtype="bfloat16")`).

The task is the plain causal LM forward over B x L random tokens, all logits materialised ([8, 512, 49152] f32 logits
are 805 MB on each side):
  torch  `model(input_ids, use_cache=False).logits` under `torch.inference_mode()`, attn_implementation="sdpa"
         (the fastest CPU attention in transformers; with no padding mask it runs SDPA with is_causal=True),
         torch's default intra-op thread count (printed).
  ours   `dlmjax.model.forward_jit(cfg, params, tokens, positions, mask)` with the family default mask
         (`model.default_mask`, causal here) and positions built once outside the timed call, outputs blocked on.
Timing: ours is first traced + compiled ahead of time (`forward_jit.lower(...).compile()`, timed: "compile s"), then
its first call is timed alone (the JSON also keeps first call - median call), then `--warmup` untimed calls of each,
then `--reps` timed calls interleaved torch/ours (so background load hits both alike); the table shows medians.
ratio = torch ms / ours ms (> 1: ours is faster).
`--hidden-only` adds the same comparison without the LM head (torch `model.model(...)`, ours `hidden_states`).
Each row also checks the two outputs agree (max |diff| relative to max |logit|, argmax agreement).

  .venv/bin/python bench/forward.py                      # full table: f32 + bf16, B in {1, 8}, L in {128, 512}
  .venv/bin/python bench/forward.py --quick --tiny       # smoke run (tiny model, tiny shapes, 1 rep)
  .venv/bin/python bench/forward.py --dtypes bfloat16 --batch 8 --lengths 512 --reps 10 --out /tmp/fwd.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bench.common import csv_list, machine_info, markdown_table, median_ms, timed  # noqa: E402

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), geometry and numerics fields only.
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu", bos_token_id=0,
                    eos_token_id=0, pad_token_id=None)
# A tiny model of the same shape family, for the smoke test.
TINY = dict(SMOLLM2_135M, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=512)

DTYPES = ("float32", "bfloat16")


_ints = csv_list(int)
_dtypes = csv_list(str, DTYPES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", type=_dtypes, default=list(DTYPES),
                   help="comma-separated compute/param dtypes (default float32,bfloat16)")
    p.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--lengths", type=_ints, default=None, help="comma-separated sequence lengths (default 128,512)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per framework and row (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per framework and row (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: B in {1, 2}, L = 16, 1 warmup, 1 rep (explicit flags still win)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny geometry (2 layers, hidden 64, vocab 512) instead of SmolLM2-135M")
    p.add_argument("--hidden-only", action="store_true",
                   help="also time the trunk without the LM head (extra columns)")
    p.add_argument("--no-check", action="store_true", help="skip the torch-vs-ours output agreement columns")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: leave torch's default, printed in the header)")
    p.add_argument("--causal-chunk", type=int, default=128,
                   help="ours: query chunk for causal attention (skips keys above the diagonal, as torch's causal "
                        "SDPA does); 0 = one full masked attention. Default 128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="also write the results: JSON if the name ends in .json, markdown otherwise")
    a = p.parse_args(argv)
    a.batch = a.batch or ([1, 2] if a.quick else [1, 8])
    a.lengths = a.lengths or ([16] if a.quick else [128, 512])
    a.reps = a.reps or (1 if a.quick else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    return a


def build_checkpoints(geometry: dict, workdir: str, seed: int):
    """Random HF Llama -> save_pretrained (f32 safetensors) -> import_hf. Returns (hf_dir, dlmjax_dir)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmjax.checkpoint import import_hf

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(**geometry)
    model = LlamaForCausalLM(hf_cfg)
    hf_dir, ours_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "dlmjax")
    model.save_pretrained(hf_dir)
    del model
    import_hf(hf_dir, ours_dir)
    return hf_dir, ours_dir


def load_pair(hf_dir: str, ours_dir: str, dtype: str):
    """(torch model, our cfg, our params) at `dtype`, both from the same f32 files."""
    import torch
    from transformers import LlamaForCausalLM

    from dlmjax.checkpoint import load_checkpoint

    tmodel = LlamaForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
    impl = tmodel.config._attn_implementation
    if impl != "sdpa":
        raise RuntimeError(f"transformers picked attn_implementation={impl!r}, expected 'sdpa'")
    cfg, params = load_checkpoint(ours_dir, dtype=dtype, compute_dtype=dtype)
    if cfg.attention != "causal":
        raise RuntimeError(f"expected a causal (plain Llama) config, got attention={cfg.attention!r}")
    return tmodel, cfg, params


def _agreement(t_out, o_out) -> tuple[float, float]:
    """(max |torch - ours| / max |torch|, argmax agreement) of two [B, L, V] outputs."""
    t = t_out.float().numpy()
    o = np.asarray(o_out, dtype=np.float32)
    rel = float(np.max(np.abs(t - o)) / max(float(np.max(np.abs(t))), 1e-30))
    agree = float(np.mean(np.argmax(t, -1) == np.argmax(o, -1)))
    return rel, agree


def bench_pair(torch_fn, ours_fn, warmup: int, reps: int, check: bool, compile_fn=None):
    """Time one (torch, ours) pair of zero-argument callables. Returns a dict of ms / s / agreement figures.

    compile_fn: zero-argument callable that traces + compiles ours ahead of time (timed as compile_s).
    """
    compile_s = timed(compile_fn)[0] if compile_fn is not None else None
    first_s, o_out = timed(ours_fn)
    del o_out
    for _ in range(warmup):
        torch_fn()
    for _ in range(max(warmup - 1, 0)):  # ours' first call was one warm-up already
        timed(ours_fn)
    t_s, o_s = [], []
    t_out = o_out = None
    for _ in range(reps):
        del t_out, o_out  # free the previous outputs before the next pair (805 MB each at the largest shape)
        dt, t_out = timed(torch_fn)
        t_s.append(dt)
        dt, o_out = timed(ours_fn)
        o_s.append(dt)
    r = {"torch_ms": median_ms(t_s), "ours_ms": median_ms(o_s), "first_call_s": first_s,
         "torch_all_ms": [1e3 * x for x in t_s], "ours_all_ms": [1e3 * x for x in o_s]}
    r["ratio"] = r["torch_ms"] / r["ours_ms"]
    r["torch_min_ms"], r["ours_min_ms"] = 1e3 * min(t_s), 1e3 * min(o_s)
    r["ratio_min"] = r["torch_min_ms"] / r["ours_min_ms"]
    r["first_minus_median_s"] = first_s - r["ours_ms"] / 1e3
    r["compile_s"] = compile_s if compile_s is not None else r["first_minus_median_s"]
    if check:
        r["max_rel_diff"], r["argmax_agree"] = _agreement(t_out, o_out)
    return r


def run(args) -> tuple[list[dict], dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from dlmjax import model as M

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    geometry = TINY if args.tiny else SMOLLM2_135M
    info = machine_info()
    info["geometry"] = "tiny" if args.tiny else "SmolLM2-135M"
    info["torch_attn_implementation"] = "sdpa"
    hidden_jit = jax.jit(M.hidden_states, static_argnums=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlmjax-bench-") as work:
        t0 = time.perf_counter()
        hf_dir, ours_dir = build_checkpoints(geometry, work, args.seed)
        print(f"# built + imported the random {info['geometry']} checkpoint in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        rng = np.random.default_rng(args.seed)
        for dtype in args.dtypes:
            tmodel, cfg, params = load_pair(hf_dir, ours_dir, dtype)
            for b in args.batch:
                for n in args.lengths:
                    tokens_np = rng.integers(0, cfg.vocab_size, (b, n), dtype=np.int32)
                    ids = torch.from_numpy(tokens_np.astype(np.int64))
                    tokens = jnp.asarray(tokens_np)
                    valid = jnp.ones((b, n), bool)
                    positions = M.default_positions(cfg, valid)
                    mask = M.default_mask(cfg, valid, positions)
                    jax.block_until_ready((tokens, positions, mask))

                    def torch_logits():
                        with torch.inference_mode():
                            return tmodel(input_ids=ids, use_cache=False).logits

                    def ours_logits():
                        return M.forward_jit(cfg, params, tokens, positions, mask, args.causal_chunk)

                    def ours_compile():
                        return M.forward_jit.lower(cfg, params, tokens, positions, mask, args.causal_chunk).compile()

                    row = {"dtype": dtype, "B": b, "L": n,
                           **bench_pair(torch_logits, ours_logits, args.warmup, args.reps, not args.no_check,
                                        ours_compile)}
                    if args.hidden_only:
                        def torch_hidden():
                            with torch.inference_mode():
                                return tmodel.model(input_ids=ids, use_cache=False).last_hidden_state

                        def ours_hidden():
                            return hidden_jit(cfg, params, tokens, positions, mask)[0]

                        def hidden_compile():
                            return hidden_jit.lower(cfg, params, tokens, positions, mask).compile()

                        h = bench_pair(torch_hidden, ours_hidden, args.warmup, args.reps, False, hidden_compile)
                        row.update({f"hidden_{k}": v for k, v in h.items()})
                    rows.append(row)
                    print(f"# {dtype} B={b} L={n}: torch {row['torch_ms']:.1f} ms, ours {row['ours_ms']:.1f} ms, "
                          f"ratio {row['ratio']:.2f}, compile {row['compile_s']:.2f} s", file=sys.stderr, flush=True)
            del tmodel, params
    return rows, info


def render(rows: list[dict], info: dict, args, command: str) -> str:
    headers = ["dtype", "B", "L", "torch ms", "ours ms", "ratio", "ratio (min)", "compile s"]
    if args.hidden_only:
        headers += ["torch trunk ms", "ours trunk ms", "trunk ratio"]
    if not args.no_check:
        headers += ["max rel diff", "argmax agree"]
    body = []
    for r in rows:
        cells = [r["dtype"], r["B"], r["L"], f"{r['torch_ms']:.1f}", f"{r['ours_ms']:.1f}", f"{r['ratio']:.2f}",
                 f"{r['ratio_min']:.2f}", f"{r['compile_s']:.2f}"]
        if args.hidden_only:
            cells += [f"{r['hidden_torch_ms']:.1f}", f"{r['hidden_ours_ms']:.1f}", f"{r['hidden_ratio']:.2f}"]
        if not args.no_check:
            cells += [f"{r['max_rel_diff']:.1e}", f"{r['argmax_agree']:.3f}"]
        body.append(cells)
    head = [f"command: `{command}`",
            f"model: random-weight {info['geometry']} (Llama, tied embeddings), causal mask, all logits materialised",
            f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']} on {', '.join(info['jax_devices'])}; "
            f"torch {info.get('torch')} with {info.get('torch_threads')} threads, transformers "
            f"{info.get('transformers')} attn_implementation=sdpa; XLA_FLAGS={info['XLA_FLAGS']!r}",
            f"medians of {args.reps} timed calls after {args.warmup} warm-up calls, interleaved torch/ours; "
            "ratio = torch ms / ours ms (> 1: ours faster); ratio (min) = fastest torch call / fastest ours call; "
            f"compile s = ours' trace + lower + compile "
            f"(`forward_jit.lower(...).compile()`); load average (1 min) at the start / end: "
            f"{info['load_avg_1m']:.2f} / {os.getloadavg()[0]:.2f} on {info['cores']} cores"]
    return "\n".join(head) + "\n\n" + markdown_table(headers, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/forward.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rows, info = run(args)
    text = render(rows, info, args, command.strip())
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump({"command": command.strip(), "machine": info, "reps": args.reps, "warmup": args.warmup,
                           "rows": rows}, f, indent=2)
            else:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
