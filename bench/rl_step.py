#!/usr/bin/env python
"""RL benchmarks (issue 12 §7): outer-step time split, SLIM-RL vs TraceRL; the RL update and the rollout, ours vs
PyTorch on the same weights in the same run.

Model. One random-weight `transformers` `Qwen3ForCausalLM` of the SmolLM2-135M geometry (hidden 576, 9 / 3 heads of
64, MLP 1536, vocab 49152, rope_theta 1e5, untied LM head as in bench/decode.py; `--layers` sets the depth: default 2
so that every section finishes in minutes on 2 cores, `--layers 30` is the full model; `--tiny`: hidden 64,
vocab 512) is saved, relabelled `model_type: sdar` (block-causal + q/k RMSNorm) and imported with
`dlmjax.checkpoint.import_hf`, so both frameworks run exactly the same f32 weights. The final RMSNorm weight is set to
`--sharpen` (default 20, tiny 48; both sides): logits scale by that factor, confidences spread over (0, 1), and the
threshold rules commit several tokens per step (TPF > 1), so TraceRL's trajectories have fewer steps than tokens.

Sections (`--sections`, comma-separated; default all):
  outer    `dlmjax.rl.job.run_rl` itself (the launcher's RL job minus the flag parsing), SLIM-RL and TraceRL at each
           K in `--ks` (default 4,16; S = K), with the same prompts (random tokens, `--prompts` x G = `--group`),
           the same seeds and the same minibatch (`--minibatch` rows per optimizer step). Rollouts: SLIM tau-budget,
           TraceRL dynamic (`--tracerl-rule`), tau 0.9, m 1, T 1, top-p 1, the mask token forbidden, no stop ids
           (every response is `--gen` tokens). Reward: a synthetic `reward_fn`, the fraction of even token ids in
           the response (varies inside a group, so advantages are non-zero); group_filter = "none" (no group is
           dropped: the math filter would need real answers). Objective defaults otherwise (SLIM: 3 quadrature rows,
           sequence loss; TraceRL: slices with shrink 1, token loss), AdamW lr 1e-6 constant, clip 1, f32.
           The times are the job's own per-outer-step metrics (time_rollout / time_reward / time_old_policy /
           time_update); outer step 1 compiles everything and is excluded: medians over steps 2..`--outer-steps`.
           update cost per rollout = time_update / rollouts of the step; ratio = SLIM / TraceRL (goal <= 1/2 at
           K = 16).
  update   one RL update step (SLIM sequence-level loss, §1.5 / §4.1) on the same materialised rows, ours vs a
           PyTorch re-statement, at K = the last of `--ks` (default 16). Rows: `--update-rollouts` random rollouts (prompt `--prompt-len`, responses of
           `--gen` tokens, the last ones shorter: response pads are dropped from the targets), SLIM quadrature rows
           from `dlmjax.rl.masking.slim_rows`, one optimizer step over all of them (`dlmjax.rl.batch.make_batch`
           with minibatch = rows). logp_old = ours' old-policy pass (`make_token_logprobs`) minus a fixed
           U(-0.2, 0.2) per-token offset (so s != 1 and the loss depends on the model; some rows clip), given to
           both sides; advantages fixed N(0, 1).
             ours   `make_train_step(make_rl_objective(...))`: one jit, state donated, AdamW (optax) lr 1e-6, clip 1.
             torch  `Qwen3ForCausalLM` from the same HF directory in train mode, SDPA, the extended [prompt | clean |
                    noisy] rows with position ids and the block attention mask as a 4-D additive float mask, both
                    re-stated from the spec in tests/reference/np_rl.py (not dlmjax); `logits_to_keep = L1` (the
                    noisy positions only); f32 log_softmax, gather; the §4.1 loss (sequence ratio clamp +-10, clip
                    [0.9, 1.1], k3 KL / L1, beta 0.01, weighted by w, mean over rows); backward, clip_grad_norm_(1),
                    torch.optim.AdamW(fused=True) lr 1e-6, zero_grad.
           Interleaved in one process: (ours, torch) x (1 warm-up + `--reps`); step 0 of each side starts from the
           same weights, so their losses and grad norms must agree (relative differences printed).
           ratio = torch ms / ours ms (goal >= 1.0).
  rollout  rollout tokens/s at B = `--rollout-batch` (default 64), greedy SDAR tau-budget (tau 0.9, m 1, K =
           `--rollout-k`, S = K), prompts of `--prompt-len` random tokens, `--rollout-gen` tokens per row:
             ours           `dlmjax.decode.api.generate` (what the RL job calls), stacked params as the job passes.
             torch batched  bench/decode.py's lock-step PyTorch loop with a transformers DynamicCache (all B rows).
             torch ref      tests/reference/torch_loops.sdar_block_decode, one row at a time, no cache (the
                            reference loop the decoder tests check against), on the first `--ref-rows` rows (it is
                            per-row: its tokens/s does not depend on B).
           tokens equal = fraction of ours' tokens equal to each torch loop's. ratio = ours tok/s / torch tok/s
           (goal >= 2).

  .venv/bin/python bench/rl_step.py                                   # defaults (minutes on 2 cores)
  .venv/bin/python bench/rl_step.py --tiny --quick --json /tmp/rl.json   # smoke run (seconds)
  .venv/bin/python bench/rl_step.py --layers 30 --prompts 8 --group 8 --gen 64 --outer-steps 3   # scaled up
"""

from __future__ import annotations

import argparse
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

from bench.common import block, csv_list, machine_info, markdown_table  # noqa: E402
from bench.forward import SMOLLM2_135M, TINY  # noqa: E402

SECTIONS = ("outer", "update", "rollout")
DEFAULT_SHARPEN = {"SmolLM2-135M": 20.0, "tiny": 48.0}
RESULT = "@@rl-bench-json "  # prefix of the one JSON line with every result (the smoke test reads it)
LR = 1e-6  # AdamW lr of every section (issue 12 §1 default)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=csv_list(str, SECTIONS), default=list(SECTIONS),
                   help=f"comma-separated, of {SECTIONS}")
    p.add_argument("--quick", action="store_true", help="smoke sizes (explicit flags still win)")
    p.add_argument("--tiny", action="store_true", help="tiny geometry (hidden 64, vocab 512) instead of SmolLM2-135M")
    p.add_argument("--layers", type=int, default=None, help="depth (default 2; tiny 2; 30 = full SmolLM2-135M)")
    p.add_argument("--sharpen", type=float, default=None, help="final-norm weight (default 20; tiny 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 16; quick 8)")
    p.add_argument("--gen", type=int, default=None, help="outer/update: response tokens (default 32; quick 16)")
    # outer
    p.add_argument("--ks", type=csv_list(int), default=None, help="outer: block sizes K (default 4,16; quick 4)")
    p.add_argument("--prompts", type=int, default=None, help="outer: prompts per outer step (default 2)")
    p.add_argument("--group", type=int, default=None, help="outer: rollouts per prompt G (default 4; quick 2)")
    p.add_argument("--minibatch", type=int, default=8, help="outer: rows per optimizer step (default 8)")
    p.add_argument("--outer-steps", type=int, default=None,
                   help="outer: outer steps per run, the first (compiling) one excluded (default 3; quick 2)")
    p.add_argument("--tracerl-rule", default="dynamic", help="outer: TraceRL's rollout rule (default dynamic)")
    # update
    p.add_argument("--update-rollouts", type=int, default=None, help="update: rollouts -> 3 rows each (default 4)")
    p.add_argument("--reps", type=int, default=None, help="update: timed steps per side after 1 warm-up (default 3)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    # rollout
    p.add_argument("--rollout-batch", type=int, default=None, help="rollout: B (default 64; quick 4)")
    p.add_argument("--rollout-gen", type=int, default=None, help="rollout: tokens per row (default 16; quick 8)")
    p.add_argument("--rollout-k", type=int, default=4, help="rollout: block size K = S (default 4)")
    p.add_argument("--rollout-reps", type=int, default=None, help="rollout: timed calls per loop (default 2; quick 1)")
    p.add_argument("--ref-rows", type=int, default=None, help="rollout: rows of the per-row torch reference (8; 2)")
    p.add_argument("--json", default=None, help="also write every result as JSON to this file")
    p.add_argument("--out", default=None, help="also write the printed tables (markdown) to this file")
    a = p.parse_args(argv)
    q = a.quick
    a.layers = a.layers or 2
    a.prompt_len = a.prompt_len or (8 if q else 16)
    a.gen = a.gen or (16 if q else 32)
    a.ks = a.ks or ([4] if q else [4, 16])
    a.prompts = a.prompts or 2
    a.group = a.group or (2 if q else 4)
    a.outer_steps = a.outer_steps or (2 if q else 3)
    a.update_rollouts = a.update_rollouts or (2 if q else 4)
    a.reps = a.reps or (1 if q else 3)
    a.rollout_batch = a.rollout_batch or (4 if q else 64)
    a.rollout_gen = a.rollout_gen or (8 if q else 16)
    a.rollout_reps = a.rollout_reps or (1 if q else 2)
    a.ref_rows = min(a.ref_rows or (2 if q else 8), a.rollout_batch)
    if a.outer_steps < 2:
        p.error("--outer-steps must be >= 2 (the first one compiles and is excluded)")
    return a


# ----------------------------------------------------------------------------------------------------------------
# the model: one random Qwen3 (= SDAR layers) saved as HF + imported into dlmjax


def build_model(args, work: str):
    """(torch Qwen3 model (eval), HF dir, dlmjax cfg, dlmjax params) with the same f32 weights."""
    import torch
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bench.decode import _hf_geometry
    from dlmjax.checkpoint import import_hf, load_checkpoint

    transformers.utils.logging.disable_progress_bar()
    geometry = dict(TINY if args.tiny else SMOLLM2_135M, num_hidden_layers=args.layers)
    mask_id = geometry["vocab_size"] - 1
    torch.manual_seed(args.seed)
    qm = Qwen3ForCausalLM(Qwen3Config(**_hf_geometry(geometry), attn_implementation="sdpa")).eval()
    with torch.no_grad():
        qm.model.norm.weight.fill_(args.sharpen)
    hf = os.path.join(work, "sdar_hf")
    qm.save_pretrained(hf)
    with open(os.path.join(hf, "config.json")) as f:
        raw = json.load(f)
    raw.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=args.ks[0], mask_token_id=mask_id)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    import_hf(hf, os.path.join(work, "sdar"))
    cfg, params = load_checkpoint(os.path.join(work, "sdar"))
    assert cfg.family == "sdar" and cfg.mask_token_id == mask_id and cfg.qk_norm
    return qm, hf, cfg, params, geometry


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _load():
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------------------------
# outer


def _even_reward(completions, samples, n_tokens):
    """The fraction of even token ids in the response (completions are space-joined ids): varies between the
    rollouts of one prompt, so group advantages are non-zero and no group is all-equal."""
    vals = []
    for c in completions:
        ids = [int(t) for t in c.split()]
        vals.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return np.asarray(vals, np.float32), 0


def run_outer(args, cfg, params, method: str, k: int, work: str, log) -> dict:
    from dlmjax.decode.sdar import BlockDecodeConfig
    from dlmjax.rewards.registry import RewardConfig
    from dlmjax.rl.config import RLObjectiveConfig
    from dlmjax.rl.job import RLRunConfig, run_rl
    from dlmjax.train.config import OptimConfig, StepConfig
    from dlmjax.train.loop import LoopConfig

    rng = np.random.default_rng(args.seed)  # same prompts for every (method, K)
    samples = [{"prompt_ids": rng.integers(1, cfg.vocab_size - 1, args.prompt_len).tolist(), "answer": ""}
               for _ in range(args.prompts)]
    rule = "tau_budget" if method == "slim" else args.tracerl_rule
    wd = os.path.join(work, f"rl_{method}_{k}")
    run = RLRunConfig(
        loop=LoopConfig(workdir=wd, steps=args.outer_steps, log_every=1, save_every=10 ** 6, keep=1, resume=False,
                        export=False, tensorboard=False, async_save=False),
        objective=RLObjectiveConfig(objective=method, block_size=k, group_filter="none"),
        rollout=BlockDecodeConfig(block_size=k, steps=k, max_new_tokens=args.gen, rule=rule, tau=0.9, budget_m=1.0,
                                  temperature=1.0, top_p=1.0, forbid_mask_token=True),
        reward=RewardConfig(kind="exact", workers=0),
        optim=OptimConfig(lr=LR, total_steps=10 ** 6, schedule="constant", clip_norm=1.0),
        step=StepConfig(global_batch=args.minibatch, seed=args.seed),
        prompts_per_step=args.prompts, group_size=args.group, max_prompt_len=args.prompt_len)
    load0 = _load()
    t0 = time.perf_counter()
    out = run_rl(run, cfg, params, samples, lambda ids: " ".join(map(str, ids)), cfg.eos_token_id or 0,
                 log=lambda *_: None, reward_fn=_even_reward)
    wall = time.perf_counter() - t0
    hist = out["history"]
    assert out["status"] == "done" and len(hist) == args.outer_steps, out["status"]
    warm = hist[1:]
    n_ro = args.prompts * args.group
    r = dict(method=method, K=k, rule=rule, rollouts=n_ro, steps=len(warm), wall_s=wall, load_before=load0,
             load_after=_load(), history=hist)
    for name in ("rollout", "reward", "old_policy", "update"):
        r[f"{name}_s"] = _med([h[f"time_{name}"] for h in warm])
    r["first_step_s"] = sum(hist[0][f"time_{n}"] for n in ("rollout", "reward", "old_policy", "update"))
    r["rows"] = _med([h["rows"] for h in warm])
    r["rows_per_rollout"] = _med([h["rows"] / n_ro for h in warm])
    r["updates"] = _med([h.get("updates", 0.0) for h in warm])
    r["tpf"] = _med([h["tpf"] for h in warm])
    r["mask_ratio"] = _med([h.get("mask_ratio", float("nan")) for h in warm])
    r["update_per_rollout_ms"] = 1e3 * r["update_s"] / n_ro
    r["old_policy_per_rollout_ms"] = 1e3 * r["old_policy_s"] / n_ro
    r["total_s"] = sum(r[f"{n}_s"] for n in ("rollout", "reward", "old_policy", "update"))
    log(f"outer {method} K={k}: rows/rollout {r['rows_per_rollout']:.2f}, update {r['update_s']:.2f} s, "
        f"rollout {r['rollout_s']:.2f} s, TPF {r['tpf']:.2f}")
    return r


def section_outer(args, ctx, log):
    cfg, params, work = ctx["cfg"], ctx["params"], ctx["work"]
    rows = []
    for k in args.ks:
        for method in ("slim", "tracerl"):
            rows.append(run_outer(args, cfg, params, method, k, work, log))
    ratios = {}
    for k in args.ks:
        s = next(r for r in rows if r["K"] == k and r["method"] == "slim")
        t = next(r for r in rows if r["K"] == k and r["method"] == "tracerl")
        ratios[k] = dict(update=s["update_per_rollout_ms"] / t["update_per_rollout_ms"],
                         old_policy=s["old_policy_per_rollout_ms"] / t["old_policy_per_rollout_ms"],
                         rows=s["rows_per_rollout"] / t["rows_per_rollout"], total=s["total_s"] / t["total_s"])
    headers = ["method", "K", "rule", "rollouts", "rows / rollout", "optimizer steps", "TPF", "rollout s", "reward s",
               "old-policy s", "update s", "total s", "update ms / rollout", "old-policy ms / rollout",
               "first step s", "load"]
    body = [[r["method"], r["K"], r["rule"], r["rollouts"], f"{r['rows_per_rollout']:.2f}", f"{r['updates']:.0f}",
             f"{r['tpf']:.2f}", f"{r['rollout_s']:.3f}", f"{r['reward_s']:.4f}", f"{r['old_policy_s']:.3f}",
             f"{r['update_s']:.3f}", f"{r['total_s']:.3f}", f"{r['update_per_rollout_ms']:.1f}",
             f"{r['old_policy_per_rollout_ms']:.1f}", f"{r['first_step_s']:.1f}",
             f"{r['load_before']:.1f} -> {r['load_after']:.1f}"] for r in rows]
    rhead = ["K", "rows / rollout SLIM/TraceRL", "update cost / rollout SLIM/TraceRL",
             "old-policy / rollout SLIM/TraceRL", "outer step wall SLIM/TraceRL", "goal (K = 16: update <= 0.5)"]
    rbody = [[k, f"{v['rows']:.3f}", f"{v['update']:.3f}", f"{v['old_policy']:.3f}", f"{v['total']:.3f}",
              ("met" if v["update"] <= 0.5 else "not met") if k == 16 else "-"] for k, v in ratios.items()]
    text = (f"### Outer step: SLIM-RL vs TraceRL (run_rl, {args.prompts} prompts x G {args.group}, P "
            f"{args.prompt_len}, {args.gen} new tokens, minibatch {args.minibatch}; medians of outer steps 2.."
            f"{args.outer_steps})\n\ntimes are the job's metrics time_rollout / time_reward / time_old_policy / "
            "time_update (seconds per outer step); first step s = the compiling first step (excluded); reward: "
            "fraction of even token ids in the response; group_filter none\n\n" + markdown_table(headers, body)
            + "\n\n" + markdown_table(rhead, rbody))
    for r in rows:
        r.pop("history")
    return text, {"rows": rows, "ratios": {str(k): v for k, v in ratios.items()}}


# ----------------------------------------------------------------------------------------------------------------
# update: ours vs torch on the same rows


def make_update_batch(args, cfg, k: int):
    from dlmjax.rl.batch import make_batch
    from dlmjax.rl.layout import pack_rollouts
    from dlmjax.rl.masking import slim_rows

    rng = np.random.default_rng(args.seed + 7)
    n, pad = args.update_rollouts, 0
    prompts = [rng.integers(1, cfg.vocab_size - 1, args.prompt_len).tolist() for _ in range(n)]
    lens = [args.gen - (i * args.gen // (2 * n)) for i in range(n)]  # the last responses shorter: pads in L1
    responses = [rng.integers(1, cfg.vocab_size - 1, m).tolist() for m in lens]
    packed = pack_rollouts(prompts, responses, pad, l1=args.gen)
    rows = slim_rows(packed, cfg.mask_token_id, rng, k)
    adv = rng.normal(size=n).astype(np.float32)
    return make_batch(packed, rows, adv, len(rows)), rng


def section_update(args, ctx, log):
    import jax
    import torch

    from dlmjax import sharding as mesh_lib
    from dlmjax.rl.config import RLObjectiveConfig
    from dlmjax.rl.objectives import make_rl_objective
    from dlmjax.train import step as step_lib
    from dlmjax.train.config import MeshConfig, OptimConfig, StepConfig
    from tests.reference import hf_models as R
    from tests.reference import np_rl

    cfg, params, k = ctx["cfg"], ctx["params"], args.ks[-1]
    batch, rng = make_update_batch(args, cfg, k)
    nrows = batch["input_ids"].shape[0]
    l0, l1 = batch["prompt_valid"].shape[1], batch["targets"].shape[1]

    # ours: the RL job's step and old-policy pass
    rc = RLObjectiveConfig(objective="slim", block_size=k)
    oc = OptimConfig(lr=LR, total_steps=10 ** 6, schedule="constant", clip_norm=1.0)
    mesh = mesh_lib.make_mesh(MeshConfig())
    tx = step_lib.make_optimizer(oc)
    _, combine = step_lib.trainable_view(ctx["lora"], params)
    state, state_sh = step_lib.init_state(mesh, tx, jax.tree.map(lambda x: x.copy(), params))  # donated below
    obj = make_rl_objective(cfg, rc, mesh)
    step_fn = step_lib.make_train_step(obj, StepConfig(global_batch=nrows), oc, tx, combine, mesh, state_sh, None,
                                       None)
    lp_fn = step_lib.make_token_logprobs(obj, combine, mesh, state_sh["params"], None)
    g = mesh_lib.global_batch(mesh, batch)
    logp = np.asarray(lp_fn(state["params"], None, g))
    off = rng.uniform(-0.2, 0.2, logp.shape).astype(np.float32)
    batch["logp_old"] = np.where(batch["targets"], logp - off, 0.0).astype(np.float32)
    g = mesh_lib.global_batch(mesh, batch)

    # torch: the same weights, rows re-stated from the spec (np_rl), §4.1's loss
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from transformers import Qwen3ForCausalLM

    tm = Qwen3ForCausalLM.from_pretrained(ctx["hf"], dtype=torch.float32, attn_implementation="sdpa")
    tm.train()
    pv = batch["prompt_valid"]
    mask = R.additive(np_rl.attention_mask(l0, l1, k, pv))  # [R, 1, N, N]
    pos = torch.from_numpy(np_rl.positions(pv, l1).astype(np.int64))
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    labels = ids[:, l0:l0 + l1]
    tgt = torch.from_numpy(batch["targets"])
    lp_old = torch.from_numpy(batch["logp_old"])
    adv = torch.from_numpy(batch["adv"])
    w = torch.from_numpy(batch["weight"])
    tparams = [p for p in tm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(tparams, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)

    def torch_step():
        logits = tm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=l1).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]  # [R, L1]
        d = torch.where(tgt, lp - lp_old, torch.zeros(()))
        n = tgt.sum(-1).clamp(min=1).float()
        s = torch.exp(torch.clamp(d.sum(-1) / n, -10.0, 10.0))
        gsur = torch.minimum(s * adv, torch.clamp(s, 0.9, 1.1) * adv)
        k3 = torch.where(tgt, torch.exp(torch.clamp(-d, -10.0, 10.0)) - 1.0 + d, torch.zeros(())).sum(-1) / l1
        loss = (-w * gsur + 0.01 * w * k3).mean()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(gn), lp.detach()

    with torch.no_grad():  # the torch forward's logp vs ours' old-policy pass (same weights)
        logits = tm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=l1).logits
        tlp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0].numpy()
    logp_diff = float(np.abs(np.where(batch["targets"], tlp - logp, 0.0)).max())

    jt, tt, jl, tl, jg, tg = [], [], [], [], [], []
    for i in range(1 + args.reps):
        t0 = time.perf_counter()
        state, m = step_fn(state, None, g)
        block((state, m))
        dj = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss, gn, _ = torch_step()
        dt = time.perf_counter() - t0
        jl.append(float(m["loss"]))
        jg.append(float(m["grad_norm"]))
        tl.append(loss)
        tg.append(gn)
        if i > 0:
            jt.append(dj)
            tt.append(dt)
        log(f"update rep {i}: ours {1e3 * dj:.0f} ms, torch {1e3 * dt:.0f} ms, loss {jl[-1]:.6g} / {tl[-1]:.6g}")
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
    res = dict(rows=nrows, L0=l0, L1=l1, N=l0 + 2 * l1, K=k, targets=int(batch["targets"].sum()),
               ours_ms=1e3 * _med(jt), torch_ms=1e3 * _med(tt), ours_all_ms=[1e3 * x for x in jt],
               torch_all_ms=[1e3 * x for x in tt], ours_loss=jl, torch_loss=tl, ours_grad_norm=jg, torch_grad_norm=tg,
               loss_rel_diff=rel(jl[0], tl[0]), grad_norm_rel_diff=rel(jg[0], tg[0]), logp_max_abs_diff=logp_diff,
               clip_frac=float(m["clip_frac"]) if "clip_frac" in m else None, torch_threads=torch.get_num_threads())
    res["ratio"] = res["torch_ms"] / res["ours_ms"]
    res["ratio_min"] = min(tt) / min(jt)
    headers = ["rows", "N = L0 + 2 L1", "K", "targets", "ours ms/step", "torch ms/step", "ratio torch/ours",
               "ratio (min)", "goal >= 1.0", "loss ours (step 0)", "loss torch (step 0)", "loss rel diff",
               "grad-norm rel diff", "logp max abs diff"]
    body = [[nrows, res["N"], k, res["targets"], f"{res['ours_ms']:.0f}", f"{res['torch_ms']:.0f}",
             f"{res['ratio']:.2f}", f"{res['ratio_min']:.2f}", "met" if res["ratio"] >= 1.0 else "not met",
             f"{jl[0]:.6g}", f"{tl[0]:.6g}", f"{res['loss_rel_diff']:.1e}", f"{res['grad_norm_rel_diff']:.1e}",
             f"{logp_diff:.1e}"]]
    text = (f"### RL update step: SLIM sequence loss, ours vs PyTorch (same weights, same rows and logp_old, "
            f"interleaved, medians of {args.reps} after 1 warm-up)\n\nloss / grad norm of step 0 (same starting "
            "weights on both sides); logp max abs diff = torch forward vs ours' old-policy pass on the targets; "
            f"torch {res['torch_threads']} threads, AdamW fused; both f32, AdamW lr {LR:g}, clip 1\n\n"
            + markdown_table(headers, body))
    del tm, opt
    return text, res


# ----------------------------------------------------------------------------------------------------------------
# rollout: ours (decode.api.generate) vs the PyTorch loops


def section_rollout(args, ctx, log):
    import jax
    import jax.numpy as jnp
    import torch

    from bench.decode import torch_sdar_decode
    from dlmjax.decode import api as decode_api
    from dlmjax.decode.sdar import BlockDecodeConfig
    from tests.reference import torch_loops as TL

    cfg, params, qm = ctx["cfg"], ctx["params"], ctx["torch_model"]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    b, p, gen, k = args.rollout_batch, args.prompt_len, args.rollout_gen, args.rollout_k
    rng = np.random.default_rng(args.seed + 11)
    prompts = rng.integers(1, cfg.vocab_size - 1, (b, p)).astype(np.int32)
    lens = np.full((b,), p, np.int32)
    dc = BlockDecodeConfig(block_size=k, steps=k, max_new_tokens=gen, rule="tau_budget", tau=0.9, budget_m=1.0,
                           greedy=True, forbid_mask_token=True)
    key = jax.random.key(0)

    def ours():
        return decode_api.generate(dc, cfg, params, jnp.asarray(prompts), jnp.asarray(lens), key)

    t0 = time.perf_counter()
    ro = block(ours())
    first = time.perf_counter() - t0
    ours_tok = np.asarray(ro.tokens)
    tpf = float(np.mean(np.asarray(ro.tpf)))
    ot, bt, rt = [], [], []
    bat_tok = ref_tok = None
    mask_id = cfg.mask_token_id
    for i in range(args.rollout_reps):
        t0 = time.perf_counter()
        block(ours())
        ot.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = torch_sdar_decode(qm, prompts, block=k, steps=k, gen=gen, rule="tau_budget", tau=0.9, m=1.0,
                                mask_id=mask_id)
        bt.append(time.perf_counter() - t0)
        bat_tok = out["tokens"]
        if i == 0:  # the per-row reference: once (it is slow), on the first ref_rows rows
            t0 = time.perf_counter()
            ref_tok = np.stack([TL.sdar_block_decode(qm, prompts[j], block=k, steps=k, max_new=gen, rule="tau_budget",
                                                     tau=0.9, m=1.0, greedy=True, mask_id=mask_id,
                                                     forbid_mask=True)["tokens"] for j in range(args.ref_rows)])
            rt.append(time.perf_counter() - t0)
        log(f"rollout rep {i}: ours {ot[-1]:.2f} s, torch batched {bt[-1]:.2f} s"
            + (f", torch ref ({args.ref_rows} rows) {rt[-1]:.2f} s" if i == 0 else ""))
    ours_s, bat_s, ref_s = _med(ot), _med(bt), _med(rt)
    res = dict(B=b, P=p, G=gen, K=k, tpf=tpf, ours_first_s=first, ours_s=ours_s, torch_batched_s=bat_s,
               torch_ref_s=ref_s, ref_rows=args.ref_rows, ours_tok_s=b * gen / ours_s,
               torch_batched_tok_s=b * gen / bat_s, torch_ref_tok_s=args.ref_rows * gen / ref_s,
               equal_batched=float(np.mean(bat_tok == ours_tok)),
               equal_ref=float(np.mean(ref_tok == ours_tok[:args.ref_rows])))
    res["ratio_batched"] = res["ours_tok_s"] / res["torch_batched_tok_s"]
    res["ratio_ref"] = res["ours_tok_s"] / res["torch_ref_tok_s"]
    headers = ["torch loop", "B (torch)", "G", "K", "ours s", "torch s", "ours tok/s", "torch tok/s", "ratio",
               "goal >= 2", "tokens equal", "TPF"]
    body = [["batched DynamicCache (bench/decode.py)", b, gen, k, f"{ours_s:.2f}", f"{bat_s:.2f}",
             f"{res['ours_tok_s']:.1f}", f"{res['torch_batched_tok_s']:.1f}", f"{res['ratio_batched']:.2f}",
             "met" if res["ratio_batched"] >= 2 else "not met", f"{res['equal_batched']:.3f}", f"{tpf:.2f}"],
            ["per-row reference (torch_loops.py)", args.ref_rows, gen, k, f"{ours_s:.2f}", f"{ref_s:.2f}",
             f"{res['ours_tok_s']:.1f}", f"{res['torch_ref_tok_s']:.1f}", f"{res['ratio_ref']:.2f}",
             "met" if res["ratio_ref"] >= 2 else "not met", f"{res['equal_ref']:.3f}", f"{tpf:.2f}"]]
    text = (f"### Rollout tokens/s: ours (decode.api.generate) vs PyTorch, SDAR tau-budget greedy, B = {b}, "
            f"P = {p}\n\nours: all B rows, median of {args.rollout_reps} after a compiling call ({first:.1f} s); "
            f"tok/s = rows x G / wall; the per-row reference ran once on its first {args.ref_rows} rows (its rate "
            "does not depend on B); tokens equal = fraction of ours' tokens equal to that loop's\n\n"
            + markdown_table(headers, body))
    return text, res


RUNNERS = {"outer": section_outer, "update": section_update, "rollout": section_rollout}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = ("python bench/rl_step.py " + " ".join(shlex.quote(a) for a in argv)).strip()
    import torch

    from dlmjax.train.config import LoRAConfig

    gname = "tiny" if args.tiny else "SmolLM2-135M"
    args.sharpen = args.sharpen if args.sharpen is not None else DEFAULT_SHARPEN[gname]
    info = machine_info()
    t_start = time.perf_counter()

    def log(msg):
        print(f"# [{time.perf_counter() - t_start:6.1f} s, load {_load():.1f}] {msg}", file=sys.stderr, flush=True)

    texts, results = [], {}
    with tempfile.TemporaryDirectory(prefix="dlmjax-bench-rl-") as work:
        qm, hf, cfg, params, geometry = build_model(args, work)
        log(f"built + imported the random {gname} SDAR checkpoint ({args.layers} layers)")
        ctx = dict(cfg=cfg, params=params, hf=hf, torch_model=qm, work=work, lora=LoRAConfig())
        for sec in args.sections:
            text, res = RUNNERS[sec](args, ctx, log)
            texts.append(text)
            results[sec] = res
    total = time.perf_counter() - t_start
    load_end = _load()
    head = [f"command: `{command}`",
            f"model: random-weight {gname} geometry, {args.layers} layers (Qwen3 layers = SDAR: block-causal + "
            f"q/k RMSNorm, untied LM head), final-norm weight {args.sharpen:g}, f32 on both sides",
            f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']} on {', '.join(info['jax_devices'])}; "
            f"torch {info.get('torch')} with {torch.get_num_threads()} threads, transformers "
            f"{info.get('transformers')}; load average (1 min) at the start / end: {info['load_avg_1m']:.2f} / "
            f"{load_end:.2f} on {info['cores']} cores (timings under that load); whole run {total:.0f} s"]
    text = "\n".join(head) + "\n\n" + "\n\n".join(texts)
    print(text)
    blob = {"command": command, "machine": info, "load_end": load_end, "args": vars(args), "results": results}
    print(RESULT + json.dumps(blob, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(blob, f, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
