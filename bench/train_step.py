#!/usr/bin/env python
"""Train-step benchmark: tokens/s of our MDLM train step vs a PyTorch step (same weights, same batch, same noise).

Issue text: "Tokens/s of our MDLM step vs a PyTorch step (the `transformers` model with the same weights, AdamW, same
batch), same machine, same run, f32, SmolLM2-135M geometry, B x L = 8 x 512; target >= 1.5x. Peak host memory of
each. The compiled step's `memory_analysis()` and FLOPs; a model-FLOPs-utilisation estimate where a GPU is available."

Model. A random-weight `LlamaForCausalLM` of the SmolLM2-135M geometry (bench/forward.py's SMOLLM2_135M: hidden 576,
30 layers, 9 / 3 heads of 64, MLP 1536, vocab 49152, tied embeddings, rope_theta 1e5; `--tiny`: hidden 64, vocab 512;
`--layers N` overrides the depth) is saved twice from one state dict: with `save_pretrained` (the torch side loads
it) and renamed to LLaDA's keys + a LLaDA config.json (tests/reference/hf_models.py), imported with
`dlmjax.checkpoint.import_hf` -> family "llada", bidirectional attention, mask id = vocab - 1. Both sides run exactly
the same f32 weights.

Batch. B rows of L random tokens (never the mask id); the first `--prompt-frac` of every row is prompt (not
maskable), the rest response (maskable); no padding.

The step, on each side, is dLLM's MDLMTrainer step (spec trims_mdlm.md §3.3 / §3.6) + HF Trainer's optimizer step:
  t ~ eps + (1 - eps) U[0, 1) per row (eps 1e-3), masked = (U < t) & maskable, x_t = mask id where masked,
  bidirectional forward, f32 CE at the masked positions weighted by 1 / (t + 1e-6), token normalisation
  (sum / #maskable), backward, global-norm clipping at 1.0, AdamW (lr 1e-4 constant, betas (0.9, 0.999), eps 1e-8,
  weight decay 0), zero grads.
  ours   `dlmjax.train.step.make_train_step` on a 1-device mesh with `make_objective(cfg, ObjectiveConfig(ce_chunk=
         --ce_chunk), B)`, `OptimConfig(lr, schedule="constant", clip_norm=1.0)`, cfg.remat = --remat; one jit, the
         state donated. Traced + compiled ahead of time (`lower(...).compile()`, timed: "compile s"); the compiled
         executable's `memory_analysis()` and `cost_analysis()` are reported.
  torch  `LlamaForCausalLM.from_pretrained(..., attn_implementation="sdpa")` in train mode, bidirectional through an
         all-zero additive 4-D float mask [B, 1, L, L] (checked: changing the last token changes position 0's
         logits); dLLM's loss exactly (`F.cross_entropy(logits[masked], ids[masked])` * weights, / #maskable),
         `loss.backward()`, `clip_grad_norm_(params, 1.0)`, `torch.optim.AdamW(..., fused=True)` (HF Trainer's
         default optim "adamw_torch_fused"; `--torch-adamw` picks foreach / for-loop), `zero_grad(set_to_none=True)`.
  Noise: both sides use the same (t, masked) per step: ours draws them inside the jitted step from
  fold_in(key, step) and per-row uniforms (dlmjax.train.noise); the parent re-draws them with the same functions and
  hands them to the torch side, which therefore skips its two `torch.rand` calls (~10 us of 8 x 512 uniforms). So the
  two losses must agree step by step (the table shows the relative difference of step 0's loss and grad norm; a
  causal torch model or a different objective would show up there).

Processes. The parent builds the checkpoints and the noise, then runs each side in its own subprocess (this script
with `--side jax` / `--side torch`), one after the other, never concurrently, so each side has the whole machine
(torch.set_num_threads(--torch-threads, default = all cores); XLA:CPU uses all cores) and its own peak host RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of the child: weights, optimizer state, activations and the
framework itself; the checkpoint is read from disk by each child). Each child runs `--warmup` untimed steps, then
`--reps` timed steps; the table shows medians. tokens/s = B * L / median step time; ratio = ours tokens/s / torch
tokens/s (> 1: ours faster).

FLOPs. "model GFLOP/step" = 6 N B L + 12 NL Hq Dh L^2 B (N = matmul params incl. the tied LM head, counted once;
the second term is bidirectional attention's QK^T and PV, forward + backward), the usual MFU numerator; achieved
model TFLOP/s of each side = that / step time. MFU = achieved / peak, only where jax's device is a GPU (peak from
`--peak-tflops`, or a small table of dense f32 / TF32 peaks by device kind); "n/a on CPU" otherwise. XLA's
`cost_analysis()['flops']` is printed as XLA reports it (XLA's cost analysis counts a while-loop body once, so the
scanned layer stack is counted once rather than NL times: compare it with the model estimate at --layers 1).

  .venv/bin/python bench/train_step.py                                   # the issue's row: 8 x 512, 30 layers
  .venv/bin/python bench/train_step.py --tiny --layers 1 --length 32 --batch 2 --reps 1 --warmup 0   # smoke run
  .venv/bin/python bench/train_step.py --ce_chunk 128 --remat dots --reps 3 --out /tmp/train.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bench.common import machine_info, markdown_table, write_llada_hf  # noqa: E402
from bench.forward import SMOLLM2_135M, TINY  # noqa: E402

RESULT = "@@train-step-result "  # prefix of the JSON line a child prints for the parent
TIME_EPS = 1e-3  # ObjectiveConfig().time_eps (dLLM's time_epsilon)
# Dense peak TFLOP/s per device kind (substring of jax's device_kind): (f32 CUDA cores, TF32 tensor cores). JAX runs
# f32 matmuls on GPU at its default precision, which XLA lowers to TF32 on Ampere and later.
GPU_PEAKS = {"H200": (67.0, 494.7), "H100": (67.0, 494.7), "A100": (19.5, 156.0), "L4": (30.3, 60.0),
             "A10": (31.2, 62.5)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="rows B (default 8)")
    p.add_argument("--length", type=int, default=512, help="sequence length L (default 512)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the geometry's, 30)")
    p.add_argument("--tiny", action="store_true", help="tiny geometry (hidden 64, vocab 512) instead of SmolLM2-135M")
    p.add_argument("--reps", type=int, default=3, help="timed steps per side (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the timed ones (default 1)")
    p.add_argument("--ce_chunk", "--ce-chunk", dest="ce_chunk", type=int, default=0,
                   help="ours: ObjectiveConfig.ce_chunk, LM head + CE over sequence chunks (default 0 = off)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="ours: ModelConfig.remat of the layer scan (default none)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default 1e-4)")
    p.add_argument("--prompt-frac", type=float, default=0.25,
                   help="leading fraction of every row that is prompt (never masked); default 0.25")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N) on the torch side (default: os.cpu_count())")
    p.add_argument("--torch-adamw", choices=("fused", "foreach", "forloop"), default="fused",
                   help="torch.optim.AdamW implementation (default fused = HF Trainer's adamw_torch_fused)")
    p.add_argument("--sides", default="jax,torch",
                   help="which sides to run, in this order (default jax,torch)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the sides' processes this many times, alternating (jax, torch, jax, torch, ...), and "
                        "pool their timed steps, so a change of background load hits both alike (default 1)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="GPU peak TFLOP/s for the MFU (default: looked up from the device kind)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="also write the results: JSON if the name ends in .json, markdown otherwise")
    p.add_argument("--side", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)  # internal: a child
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)  # internal: the parent's work dir
    a = p.parse_args(argv)
    a.sides = [s for s in a.sides.split(",") if s]
    if not set(a.sides) <= {"jax", "torch"} or not a.sides:
        p.error(f"--sides {a.sides} must name jax and/or torch")
    if a.batch <= 0 or a.length <= 1 or a.reps <= 0 or a.warmup < 0 or a.rounds <= 0:
        p.error("--batch, --length, --reps, --rounds must be positive, --warmup >= 0")
    if a.ce_chunk and a.length % a.ce_chunk:
        p.error(f"--ce_chunk {a.ce_chunk} does not divide --length {a.length}")
    a.torch_threads = a.torch_threads or os.cpu_count()
    return a


def geometry_of(args) -> dict:
    g = dict(TINY if args.tiny else SMOLLM2_135M)
    g["tie_word_embeddings"] = True
    if args.layers:
        g["num_hidden_layers"] = args.layers
    return g


def model_flops(g: dict, b: int, n: int) -> tuple[int, float]:
    """(matmul params N incl. the tied LM head once, model FLOPs of one train step = 6 N B L + 12 NL Hq Dh L^2 B)."""
    d, nl, hq, hkv, dh, i, v = (g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"],
                                g["num_key_value_heads"], g["head_dim"], g["intermediate_size"], g["vocab_size"])
    per_layer = 2 * d * hq * dh + 2 * d * hkv * dh + 3 * d * i
    n_params = nl * per_layer + v * d
    return n_params, 6.0 * n_params * b * n + 12.0 * nl * hq * dh * n * n * b


# ----------------------------------------------------------------------------------------------------------------
# parent: checkpoints, batch, noise


def build_checkpoints(g: dict, work: str, seed: int) -> tuple[str, str]:
    """One random tied Llama -> (HF Llama dir for torch, dlmjax LLaDA dir). Same f32 tensors in both."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmjax.checkpoint import import_hf

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    kw = {k: v for k, v in g.items() if k not in ("rope_theta", "pad_token_id")}
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": g["rope_theta"]}
    lcfg = LlamaConfig(**kw)
    model = LlamaForCausalLM(lcfg)
    hf_dir = os.path.join(work, "hf_llama")
    model.save_pretrained(hf_dir)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied
    del model
    mask_id = g["vocab_size"] - 1
    llada_hf = os.path.join(work, "llada_hf")
    write_llada_hf(llada_hf, sd, lcfg, g, mask_id, tie=True)
    del sd
    ours_dir = os.path.join(work, "dlmjax")
    import_hf(llada_hf, ours_dir)
    return hf_dir, ours_dir


def make_batch(args, vocab: int) -> dict:
    rng = np.random.default_rng(args.seed)
    b, n = args.batch, args.length
    ids = rng.integers(0, vocab - 1, (b, n), dtype=np.int32)  # never the mask id (vocab - 1)
    prompt = int(round(args.prompt_frac * n))
    maskable = np.broadcast_to(np.arange(n)[None, :] >= prompt, (b, n)).copy()
    return {"input_ids": ids, "maskable": maskable, "length": np.full((b,), n, np.int32)}


def step_noise(batch: dict, seed: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(t [S, B] f32, masked [S, B, L] bool) exactly as our jitted MDLM step draws them at steps 0 .. S-1:
    the batch's noise fields from fold_in(key, step) (objective.add_noise) + per-row uniforms (objectives.mdlm_like)."""
    import jax
    import jax.numpy as jnp

    from dlmjax.train import noise

    ids, maskable = batch["input_ids"], jnp.asarray(batch["maskable"])
    rows = jnp.arange(ids.shape[0], dtype=jnp.int32)
    key = jax.random.key(seed)
    ts, ms = [], []
    for s in range(n_steps):
        rng = jax.random.fold_in(key, s)
        scal, u_tok = noise.row_uniforms(rng, rows, ids.shape[1], 3)
        t = noise.sample_times(scal[:, 0], TIME_EPS)
        ts.append(np.asarray(t))
        ms.append(np.asarray(noise.mdlm_mask(t, u_tok, maskable, "linear")))
    return np.stack(ts), np.stack(ms)


# ----------------------------------------------------------------------------------------------------------------
# children


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _emit(d: dict):
    print(RESULT + json.dumps(d), flush=True)


def run_jax(args, work: str):
    import jax
    import jax.numpy as jnp

    from bench.common import block
    from dlmjax.checkpoint import load_checkpoint
    from dlmjax import sharding as mesh_lib
    from dlmjax.train import step as step_lib
    from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
    from dlmjax.train.objectives import make_objective

    data = np.load(os.path.join(work, "batch.npz"))
    batch_np = {k: data[k] for k in ("input_ids", "maskable", "length")}
    cfg, params = load_checkpoint(os.path.join(work, "dlmjax"), dtype="float32", compute_dtype="float32",
                                  remat=args.remat)
    assert cfg.family == "llada" and cfg.attention == "bidirectional", (cfg.family, cfg.attention)
    assert cfg.mask_token_id == int(data["mask_id"]), cfg.mask_token_id
    mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
    oc = ObjectiveConfig(ce_chunk=args.ce_chunk)
    assert oc.kind == "mdlm" and oc.time_eps == TIME_EPS and oc.norm == "token" and oc.weight == "scheduler"
    opt = OptimConfig(lr=args.lr, schedule="constant", clip_norm=1.0)
    sc = StepConfig(global_batch=args.batch, grad_accum=1, seed=args.seed)
    tx = step_lib.make_optimizer(opt)
    split, combine = step_lib.trainable_view(LoRAConfig(), params)
    trainable, frozen = split(params, jax.random.key(args.seed))
    state, state_sh = step_lib.init_state(mesh, tx, trainable)
    del params, trainable
    batch_sh = mesh_lib.batch_shardings(mesh, batch_np)
    batch = jax.device_put(batch_np, batch_sh)
    fn = step_lib.make_train_step(make_objective(cfg, oc, sc.global_batch), sc, opt, tx, combine, mesh, state_sh,
                                  None, batch_sh)
    noised = step_lib.make_add_noise(mesh)
    steps = [noised(batch, step_lib.step_noise(args.seed, s)) for s in range(args.warmup + args.reps)]
    t0 = time.perf_counter()
    compiled = fn.jitted(steps[0]).lower(state, frozen, steps[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mem_d = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                "temp_size_in_bytes", "alias_size_in_bytes",
                                                "generated_code_size_in_bytes") if hasattr(mem, k)}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    xla_flops = float(cost.get("flops", float("nan")))
    xla_bytes = float(cost.get("bytes accessed", float("nan")))
    times, cpu, losses, gnorms = [], [], [], []
    for s in range(args.warmup + args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, frozen, {k: steps[s][k] for k in fn.keys})
        block((state, metrics))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(metrics["loss"]))
        gnorms.append(float(metrics["grad_norm"]))
        if s >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    assert int(state["step"]) == args.warmup + args.reps
    _emit({"side": "jax", "step_s": times, "cpu_s": cpu, "compile_s": compile_s, "loss": losses, "grad_norm": gnorms,
           "memory_analysis": mem_d, "xla_flops": xla_flops, "xla_bytes_accessed": xla_bytes,
           "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
           "peak_rss_gib": _peak_rss_gib()})


def run_torch(args, work: str):
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.torch_threads)
    data = np.load(os.path.join(work, "batch.npz"))
    mask_id = int(data["mask_id"])
    ids = torch.from_numpy(data["input_ids"].astype(np.int64))
    maskable = torch.from_numpy(data["maskable"])
    ts = torch.from_numpy(data["t"])
    masks = torch.from_numpy(data["masked"])
    b, n = ids.shape
    model = LlamaForCausalLM.from_pretrained(os.path.join(work, "hf_llama"), dtype=torch.float32,
                                             attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as ours
    model.train()
    all_visible = torch.zeros((b, 1, n, n), dtype=torch.float32)  # additive 4-D mask: bidirectional, no padding

    with torch.no_grad():  # bidirectional check: position 0 must see the last token
        m = min(n, 16)
        x = ids[:1, :m].clone()
        l0 = model(input_ids=x, attention_mask=all_visible[:1, :, :m, :m], use_cache=False).logits[0, 0]
        x[0, -1] = (x[0, -1] + 1) % mask_id
        l1 = model(input_ids=x, attention_mask=all_visible[:1, :, :m, :m], use_cache=False).logits[0, 0]
        bidir_delta = float((l0 - l1).abs().max())
    assert bidir_delta > 0, "torch attention is not bidirectional"

    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"fused": True} if args.torch_adamw == "fused" else {"foreach": args.torch_adamw == "foreach"}
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kw)
    n_maskable = maskable.sum().clamp(min=1)

    def step(t, masked):
        # dLLM MDLMTrainer.compute_loss (loss_norm "token"), with (t, masked) given instead of two torch.rand calls
        noised = torch.where(masked, mask_id, ids)
        logits = model(input_ids=noised, attention_mask=all_visible, use_cache=False).logits
        w = (1.0 / (t + 1e-6)).unsqueeze(1).expand(b, n)
        tok = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none") * w[masked]
        loss = tok.sum() / n_maskable
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(gn)

    times, cpu, losses, gnorms = [], [], [], []
    for s in range(args.warmup + args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, gn = step(ts[s], masks[s])
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(loss)
        gnorms.append(gn)
        if s >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    _emit({"side": "torch", "step_s": times, "cpu_s": cpu, "loss": losses, "grad_norm": gnorms,
           "threads": torch.get_num_threads(), "adamw": args.torch_adamw, "bidirectional_delta": bidir_delta,
           "peak_rss_gib": _peak_rss_gib()})


def run_child(side: str, args, work: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--side", side, "--work", work]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} side failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"the {side} side printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(lines[-1][len(RESULT):])
    r.update(load_before=load0, load_after=os.getloadavg()[0], process_wall_s=wall)
    print(f"# {side}: steps {['%.0f' % (1e3 * x) for x in r['step_s']]} ms, peak RSS {r['peak_rss_gib']:.2f} GiB, "
          f"load {load0:.2f} -> {r['load_after']:.2f}", file=sys.stderr, flush=True)
    return r


def pool(runs: list[dict], args) -> dict:
    """One side's rounds -> one record: timed steps pooled, the first round's losses / analyses, the max peak RSS."""
    r = dict(runs[0])
    r["rounds"] = runs
    r["step_s"] = [x for q in runs for x in q["step_s"]]
    r["cpu_s"] = [x for q in runs for x in q["cpu_s"]]
    r["peak_rss_gib"] = max(q["peak_rss_gib"] for q in runs)
    r["load_after"] = runs[-1]["load_after"]
    r["median_ms"] = 1e3 * statistics.median(r["step_s"])
    r["min_ms"] = 1e3 * min(r["step_s"])
    r["cpu_median_s"] = statistics.median(r["cpu_s"])
    r["tokens_per_s"] = args.batch * args.length / (r["median_ms"] / 1e3)
    return r


# ----------------------------------------------------------------------------------------------------------------
# report


def _num(x: float) -> str:
    """Whole numbers from 100 up, three significant digits below."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mib(x) -> str:
    return f"{x / 2**20:.1f}" if x is not None else "-"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def run(args, argv: list[str]) -> dict:
    g = geometry_of(args)
    info = machine_info()
    info["geometry"] = ("tiny" if args.tiny else "SmolLM2-135M") + f", {g['num_hidden_layers']} layers"
    n_steps = args.warmup + args.reps
    res = {"geometry": g, "args": {k: v for k, v in vars(args).items() if k not in ("side", "work")}}
    with tempfile.TemporaryDirectory(prefix="dlmjax-bench-train-") as work:
        t0 = time.perf_counter()
        build_checkpoints(g, work, args.seed)
        batch = make_batch(args, g["vocab_size"])
        t, masked = step_noise(batch, args.seed, n_steps)
        np.savez(os.path.join(work, "batch.npz"), **batch, t=t, masked=masked, mask_id=g["vocab_size"] - 1)
        print(f"# built the random {info['geometry']} checkpoints + batch + noise in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        res["masked_frac"] = float(masked.sum() / (n_steps * batch["maskable"].sum()))
        runs = {side: [] for side in args.sides}
        for _ in range(args.rounds):
            for side in args.sides:
                runs[side].append(run_child(side, args, work, argv))
        for side in args.sides:
            res[side] = pool(runs[side], args)
    n_params, flops = model_flops(g, args.batch, args.length)
    res.update(n_params=n_params, model_flops=flops, info=info, load_end=os.getloadavg()[0])
    if "jax" in res and "torch" in res:
        j, tt = res["jax"], res["torch"]
        res["ratio"] = j["tokens_per_s"] / tt["tokens_per_s"]
        res["ratio_min"] = tt["min_ms"] / j["min_ms"]
        res["ratio_cpu"] = tt["cpu_median_s"] / max(j["cpu_median_s"], 1e-9)
        res["loss_rel_diff"] = [_rel(a, b) for a, b in zip(j["loss"], tt["loss"])]
        res["grad_norm_rel_diff"] = [_rel(a, b) for a, b in zip(j["grad_norm"], tt["grad_norm"])]
    return res


def _mfu_cell(res: dict, side: str, args) -> str:
    j = res.get("jax", {})
    if j.get("platform") != "gpu":
        return "n/a on CPU"
    peak = args.peak_tflops
    if peak is None:
        kind = j.get("device_kind", "")
        hit = [v for k, v in GPU_PEAKS.items() if k in kind]
        if not hit:
            return f"unknown peak for {kind!r} (--peak-tflops)"
        peak = hit[0][1]  # TF32: JAX's default f32 matmul precision on GPU
    achieved = res["model_flops"] / (res[side]["median_ms"] / 1e3) / 1e12
    return f"{100 * achieved / peak:.1f}% of {peak:g}"


def render(res: dict, args, command: str) -> str:
    info, g = res["info"], res["geometry"]
    sides = [s for s in ("jax", "torch") if s in res]
    headers = ["B", "L", "layers"]
    row = [args.batch, args.length, g["num_hidden_layers"]]
    for s in sides:
        name = "ours" if s == "jax" else "torch"
        headers += [f"{name} ms/step", f"{name} tok/s", f"{name} CPU s/step"]
        row += [_num(res[s]["median_ms"]), _num(res[s]["tokens_per_s"]), _num(res[s]["cpu_median_s"])]
    if "ratio" in res:
        headers += ["ratio ours/torch", "ratio (min)", "ratio (CPU s)"]
        row += [f"{res['ratio']:.2f}", f"{res['ratio_min']:.2f}", f"{res['ratio_cpu']:.2f}"]
    for s in sides:
        headers.append(f"{'ours' if s == 'jax' else 'torch'} peak RSS GiB")
        row.append(f"{res[s]['peak_rss_gib']:.2f}")
    if "jax" in res:
        headers.append("ours compile s")
        row.append(f"{res['jax']['compile_s']:.1f}")
    if "ratio" in res:
        headers += ["loss rel diff (step 0)", "grad-norm rel diff (step 0)"]
        row += [f"{res['loss_rel_diff'][0]:.1e}", f"{res['grad_norm_rel_diff'][0]:.1e}"]
    main = markdown_table(headers, [row])

    fl_headers = ["model GFLOP/step", "matmul params (M)"]
    fl_row = [f"{res['model_flops'] / 1e9:.4g}", f"{res['n_params'] / 1e6:.4g}"]
    for s in sides:
        name = "ours" if s == "jax" else "torch"
        fl_headers += [f"{name} model TFLOP/s", f"{name} MFU"]
        fl_row += [f"{res['model_flops'] / (res[s]['median_ms'] / 1e3) / 1e12:.3g}", _mfu_cell(res, s, args)]
    if "jax" in res:
        j = res["jax"]
        mem = j["memory_analysis"]
        fl_headers += ["XLA GFLOP (cost_analysis)", "XLA GB accessed", "argument MiB", "output MiB", "alias MiB",
                       "temp MiB", "code MiB"]
        fl_row += [f"{j['xla_flops'] / 1e9:.4g}", f"{j['xla_bytes_accessed'] / 1e9:.4g}",
                   _mib(mem.get("argument_size_in_bytes")), _mib(mem.get("output_size_in_bytes")),
                   _mib(mem.get("alias_size_in_bytes")), _mib(mem.get("temp_size_in_bytes")),
                   _mib(mem.get("generated_code_size_in_bytes"))]
    flops = markdown_table(fl_headers, [fl_row])

    loads = "; ".join(f"{'ours' if s == 'jax' else 'torch'} "
                      + ", ".join(f"{q['load_before']:.2f} -> {q['load_after']:.2f}" for q in res[s]["rounds"])
                      for s in sides)
    t = res.get("torch", {})
    head = [f"command: `{command}`",
            f"model: random-weight {info['geometry']} (LLaDA-style bidirectional Llama, tied embeddings), f32; "
            f"MDLM step (t ~ U[1e-3, 1), 1/t weights, token norm), clip 1.0, AdamW lr {args.lr:g}; B x L = "
            f"{args.batch} x {args.length}, prompt fraction {args.prompt_frac:g}, masked fraction of maskable "
            f"{res['masked_frac']:.2f}; ours: ce_chunk={args.ce_chunk}, remat={args.remat}",
            f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']} on {', '.join(info['jax_devices'])}; "
            f"torch {info.get('torch')} with {t.get('threads', args.torch_threads)} threads, AdamW "
            f"{args.torch_adamw}, transformers {info.get('transformers')} attn_implementation=sdpa + all-zero 4-D "
            f"mask; XLA_FLAGS={info['XLA_FLAGS']!r}",
            f"each side in its own process, one after the other ({', '.join(args.sides)}; {args.rounds} round(s), "
            f"alternating); medians of {args.reps} timed steps per round after {args.warmup} warm-up steps; "
            f"CPU s/step = median process CPU time (user + sys, all threads; spinning pool threads count); "
            f"tok/s = B*L / median; ratio = ours tok/s / torch tok/s (> 1: ours faster); ratio (min) = fastest "
            f"torch step / fastest ours step; ratio (CPU s) = torch CPU s / ours CPU s (less sensitive to "
            f"background load than wall time); peak RSS = ru_maxrss of each side's process; load average (1 min) "
            f"at the start / around each side / end: "
            f"{info['load_avg_1m']:.2f}; {loads}; {res['load_end']:.2f} on {info['cores']} cores"]
    tail = ["", "model FLOPs = 6 N B L + 12 NL Hq Dh L^2 B; XLA's cost_analysis counts the scanned layer body once; "
            "memory_analysis of ours' compiled step (alias = donated state reused for the output)"]
    if "jax" in res and "torch" in res:
        tail.append(f"losses per step (round 1) ours {['%.4f' % x for x in res['jax']['loss']]} / torch "
                    f"{['%.4f' % x for x in res['torch']['loss']]}; step ms ours "
                    f"{['%.0f' % (1e3 * x) for x in res['jax']['step_s']]} / torch "
                    f"{['%.0f' % (1e3 * x) for x in res['torch']['step_s']]}")
    return "\n".join(head) + "\n\n" + main + "\n\n" + flops + "\n" + "\n".join(tail)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.side is not None:
        if not args.work:
            raise SystemExit("--side needs --work")
        (run_jax if args.side == "jax" else run_torch)(args, args.work)
        return 0
    command = ("python bench/train_step.py " + " ".join(shlex.quote(a) for a in argv)).strip()
    res = run(args, argv)
    text = render(res, args, command)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump({"command": command, **{k: v for k, v in res.items()}}, f, indent=2, default=str)
            else:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
