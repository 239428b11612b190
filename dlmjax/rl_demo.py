"""The RL demo (issue 12 §5): proof on one CPU that SLIM-RL, TraceRL and random masking each learn.

1. A tiny SDAR model (block-causal attention, qk-norm) is trained from scratch with block-diffusion SFT (bd3lm, block
   size K) on 4-digit addition with the short worked answer of data/addition.py, stopped early so that held-out
   accuracy under tau-budget rollouts at T = 1 is well below 1 (room for RL). The prompt is
   `<|user|>dddd+dddd=<|assistant|>` (12 tokens, a multiple of K = 4 and of K = 12, so the decoder's absolute blocks and
   the trainers' response blocks coincide); the response `ccccc=sssss<|eos|>` is 12 tokens (3 blocks of 4).
   The SFT checkpoint is exported once (<workdir>/sft/final) and reused by every later run of the demo.
2. SLIM-RL, TraceRL and random masking start from that checkpoint with the same seed (so the same prompt stream), each
   rolling out with its own method's decoder (SLIM: tau-budget tau 0.9 m 1; TraceRL: dynamic tau 0.9; random masking:
   `random_rule`, tau-budget by default), through dlmjax.rl.job.run_rl.
3. Held-out accuracy (avg@k over n_test problems) under both decoders at T = 1, before RL and every `eval_every`
   outer steps (rl.job's eval hook), with TPF and EWC per denoising step.
4. A figure (held-out accuracy vs cumulative training rows; training reward vs rollouts) and a markdown table.

Everything is a function of the seed. A rerun reuses the SFT checkpoint and every finished RL run (its history is
saved as <workdir>/rl_<method>/history.json, keyed by the run's settings); an unfinished RL run starts again.

Variants, each in its own subdirectory of the workdir (RLDemoConfig.out_dir) with its own SFT checkpoint, so the
default demo's files are never replaced: block_size = 12 (`k12/`: the whole response is one block, the model's
block-causal attention, the SFT, the decoders and the RL rows all at K = 12) and a decaying SFT learning rate
(`sft_schedule` cosine | linear: `sft_cosine/`, `k12_sft_linear/`, ...). The SFT step count defaults to the one
calibrated for (block_size, sft_schedule) (CALIBRATED_SFT_STEPS; bench/rl_demo_calibrate.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np

METHODS = ("slim", "tracerl", "random")
SFT_SCHEDULES = ("constant", "cosine", "linear")
# SFT steps calibrated so that held-out tau-budget accuracy (avg@4, 256 problems, T = 1) lands in 0.3-0.6, per (block
# size, SFT LR schedule); docs/rl_demo_notes.md has the sweeps (bench/rl_demo_calibrate.py)
CALIBRATED_SFT_STEPS = {(4, "constant"): 700, (12, "constant"): 650, (4, "cosine"): 700}
OWN_RULE = {"slim": "tau_budget", "tracerl": "dynamic"}  # random / coupled: RLDemoConfig.random_rule
EVAL_RULES = ("tau_budget", "dynamic")


@dataclasses.dataclass(frozen=True)
class RLDemoConfig:
    workdir: str = "runs/rl_demo"
    seed: int = 0
    digits: int = 4
    n_train: int = 20000
    n_test: int = 256  # held-out problems
    eval_k: int = 4  # avg@k: k samples per held-out problem at T = 1
    # model (SDAR family)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    block_size: int = 4  # K = S (steps per block = K); 12: the whole response is one block
    # block-diffusion SFT (constant LR after warmup, so a shorter run is exactly a prefix of a longer one)
    sft_steps: int = 0  # 0: CALIBRATED_SFT_STEPS[(block_size, sft_schedule)] (K = 4, constant: 700, held-out
    #                     tau-budget acc 0.46; 600: 0.13, 650: 0.41, 750: 0.25, 800: 0.61)
    sft_batch: int = 64
    sft_lr: float = 2e-3
    sft_warmup: int = 50
    sft_schedule: str = "constant"  # LR after warmup: constant | cosine (to 0 at sft_steps) | linear (to 0)
    # RL
    methods: tuple = METHODS
    rl_steps: int = 40  # outer steps
    prompts_per_step: int = 32
    group_size: int = 8
    rl_lr: float = 1e-4
    minibatch: int = 256  # rows per optimizer step (1 epoch over the step's rows)
    group_filter: str = "math"  # math: keep groups with 0.2 <= mean reward <= 0.8 | none
    tau: float = 0.9
    budget_m: float = 1.0
    temperature: float = 1.0
    random_rule: str = "tau_budget"  # the rollout decoder of random masking
    eval_every: int = 5  # outer steps between held-out evaluations (and at the end)
    rl_seed: int = -1  # seed of the RL runs (prompt stream, rollouts, masks); -1: `seed`. The data, the init and the
    #                    SFT always use `seed`, so RL seeds can vary on one calibrated checkpoint

    @property
    def rl_seed_(self) -> int:
        return self.seed if self.rl_seed < 0 else self.rl_seed

    def __post_init__(self):
        def bad(why):
            raise ValueError(f"RLDemoConfig: {why}")

        if self.sft_schedule not in SFT_SCHEDULES:
            bad(f"sft_schedule={self.sft_schedule!r} is not one of {SFT_SCHEDULES}")
        if self.sft_steps == 0:
            n = CALIBRATED_SFT_STEPS.get((self.block_size, self.sft_schedule))
            if n is None:
                bad(f"no calibrated SFT step count for block_size={self.block_size}, sft_schedule="
                    f"{self.sft_schedule!r} (calibrated: {sorted(CALIBRATED_SFT_STEPS)}); give sft_steps "
                    "(--rl_demo_sft_steps)")
            object.__setattr__(self, "sft_steps", n)

        for f in ("n_train", "n_test", "eval_k", "sft_steps", "sft_batch", "rl_steps", "prompts_per_step",
                  "group_size", "minibatch", "eval_every", "block_size"):
            if getattr(self, f) <= 0:
                bad(f"{f}={getattr(self, f)} must be positive")
        unknown = [m for m in self.methods if m not in ("slim", "tracerl", "random", "coupled")]
        if not self.methods or unknown:
            bad(f"methods={self.methods!r}: each must be slim | tracerl | random | coupled")
        if self.prompt_len % self.block_size or self.response_len % self.block_size:
            bad(f"block_size={self.block_size} must divide the prompt ({self.prompt_len}) and response "
                f"({self.response_len}) lengths")
        if self.rl_steps % self.eval_every:
            bad(f"eval_every={self.eval_every} must divide rl_steps={self.rl_steps} (the last point is the final "
                "policy)")
        if self.group_filter not in ("math", "none"):
            bad(f"group_filter={self.group_filter!r} is not math | none")
        if self.random_rule not in EVAL_RULES:
            bad(f"random_rule={self.random_rule!r} is not one of {EVAL_RULES}")

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 4  # <|user|> a + b = <|assistant|>

    @property
    def response_len(self) -> int:
        return 2 * self.digits + 4  # carries (d+1) = sum (d+1) <|eos|>

    def rule(self, method: str) -> str:
        return OWN_RULE.get(method, self.random_rule)

    @property
    def variant(self) -> str:
        """'' for the calibrated K = 4 / constant-LR demo; else e.g. 'k12' or 'sft_cosine' (its own subdirectory)."""
        parts = ([] if self.block_size == 4 else [f"k{self.block_size}"]) + \
            ([] if self.sft_schedule == "constant" else [f"sft_{self.sft_schedule}"])
        return "_".join(parts)

    @property
    def out_dir(self) -> str:
        """Where this run's files go: `workdir` for the default demo, `workdir/<variant>` otherwise, so a K = 12 or a
        decaying-LR run never replaces the default demo's SFT checkpoint or RL runs."""
        return os.path.join(self.workdir, self.variant) if self.variant else self.workdir

    def sft_settings(self) -> dict:
        """The SFT checkpoint's identity (its settings.json). sft_schedule only when it is not the default, so the
        stamps of existing constant-LR checkpoints stay valid."""
        keys = ("seed", "digits", "n_train", "n_test", "hidden", "layers", "heads", "kv_heads", "block_size",
                "sft_steps", "sft_batch", "sft_lr", "sft_warmup")
        out = {k: getattr(self, k) for k in keys}
        if self.sft_schedule != "constant":
            out["sft_schedule"] = self.sft_schedule
        return out


# ----------------------------------------------------------------------------------------------------------------------
# data, model, decoders

def make_data(dc: RLDemoConfig) -> tuple[list[dict], list[dict]]:
    """Train / held-out records of data/addition.py with '=' appended to the prompt (a 12-token prompt at d = 4)."""
    from dlmjax.data import addition

    train, test = addition.make_splits(dc.n_train, dc.n_test, dc.digits, dc.seed)
    return [dict(r, prompt=r["prompt"] + "=") for r in train], [dict(r, prompt=r["prompt"] + "=") for r in test]


def model_config(dc: RLDemoConfig, tok):
    from dlmjax.config import ModelConfig

    return ModelConfig(family="sdar", vocab_size=len(tok), hidden_size=dc.hidden, num_layers=dc.layers,
                       num_heads=dc.heads, num_kv_heads=dc.kv_heads, head_dim=dc.hidden // dc.heads,
                       intermediate_size=3 * dc.hidden, rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True,
                       attention="block_causal", block_size=dc.block_size, mask_token_id=tok.mask_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=256)


def decoder(dc: RLDemoConfig, rule: str, tok):
    from dlmjax.decode.sdar import BlockDecodeConfig

    return BlockDecodeConfig(block_size=dc.block_size, steps=dc.block_size, max_new_tokens=dc.response_len, rule=rule,
                             tau=dc.tau, budget_m=dc.budget_m, temperature=dc.temperature,
                             stop_ids=(tok.eos_token_id,))


def prompt_ids(tok, rec: dict) -> list[int]:
    """The prompt through the chat template with the generation prompt (the SFT reader's prefix)."""
    from dlmjax.data.sft import _template

    return _template(tok, [{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True)


def detokenizer(tok):
    """ids -> text, fast: characters as they are, EOS / pad dropped, any other special (the mask id) as '?' so a
    response holding one never scores."""
    table = {}
    for t, i in tok.get_vocab().items():
        table[i] = "" if i in (tok.eos_token_id, tok.pad_token_id) else (t if len(t) == 1 else "?")
    return lambda ids: "".join(table.get(int(i), "?") for i in ids)


def make_eval(dc: RLDemoConfig, model_cfg, tok, test: list[dict]):
    """eval_fn(step, params) -> {acc_<rule>, tpf_<rule>, ewc_step_<rule>} over avg@k on the held-out problems, each
    rule with its own fixed key (the same samples' randomness at every evaluation point)."""
    import jax
    import jax.numpy as jnp

    from dlmjax.data.addition import score
    from dlmjax.decode import api as decode_api
    from dlmjax.rl.job import left_pad

    ids = [prompt_ids(tok, r) for r in test] * dc.eval_k
    answers = [r["answer"] for r in test] * dc.eval_k
    prompts, lens = left_pad(ids, tok.pad_token_id)
    prompts, lens = jnp.asarray(prompts), jnp.asarray(lens)
    detok = detokenizer(tok)
    decs = {rule: decoder(dc, rule, tok) for rule in EVAL_RULES}

    def eval_fn(step, params) -> dict:
        out = {}
        for j, (rule, dcfg) in enumerate(decs.items()):
            key = jax.random.fold_in(jax.random.key(dc.seed + 1000), j)
            ro = jax.device_get(decode_api.generate(dcfg, model_cfg, params, prompts, lens, key))
            ok = [score(detok(ro.tokens[i, :ro.lengths[i]]), a) for i, a in enumerate(answers)]
            out[f"acc_{rule}"] = float(np.mean(ok))
            out[f"tpf_{rule}"] = float(np.mean(ro.tpf))
            out[f"ewc_step_{rule}"] = float(np.sum(ro.ewc_per_step) / max(int(np.sum(ro.n_steps)), 1))
        return out

    return eval_fn


# ----------------------------------------------------------------------------------------------------------------------
# SFT (once) and the RL runs

def stopped(summ: dict, what: str):
    """A run the loop left early (SIGTERM: it saves and returns): stop the demo there, so that it never stamps a partial
    SFT checkpoint, evaluates it or trains from it, nor records a partial RL run as finished. A rerun starts that
    piece again."""
    if summ["status"] != "done":
        raise SystemExit(f"rl_demo: {what} {summ['status']} at step {summ['step']}; rerun the demo to run it again")


def sft_run_config(dc: RLDemoConfig, sft_dir: str, train_path: str, tok_dir: str, save_every: int = 0, keep: int = 1):
    """The block-diffusion SFT run (save_every 0: one checkpoint at the end; bench/rl_demo_calibrate.py saves more)."""
    from dlmjax.data.pipeline import SFTDataConfig
    from dlmjax.train.config import ObjectiveConfig, OptimConfig
    from dlmjax.train.loop import LoopConfig
    from dlmjax.train.sft import SFTRunConfig

    n = dc.sft_steps
    return SFTRunConfig(
        loop=LoopConfig(workdir=sft_dir, steps=n, log_every=max(n // 10, 1), save_every=save_every or n, keep=keep,
                        resume=False, tensorboard=False, async_save=False),
        data=SFTDataConfig(path=train_path, max_length=dc.prompt_len + dc.response_len,
                           global_batch_size=dc.sft_batch, seed=dc.seed),
        objective=ObjectiveConfig(kind="bd3lm", block_size=dc.block_size, block_noise="block"),
        optim=OptimConfig(lr=dc.sft_lr, total_steps=n, warmup_steps=min(dc.sft_warmup, n), schedule=dc.sft_schedule,
                          end_lr_ratio=0.0, weight_decay=0.01),
        tokenizer_dir=tok_dir)


def sft(dc: RLDemoConfig, tok, train: list[dict], log=print, save_every: int = 0, keep: int = 1):
    """(model_cfg, params, seconds): the block-diffusion SFT checkpoint, trained once and reused."""
    from dlmjax.checkpoint.convert import load_checkpoint
    from dlmjax.data import addition
    from dlmjax.train.sft import build_model, run_sft

    cfg = model_config(dc, tok)
    sft_dir = os.path.join(dc.out_dir, "sft")
    final, stamp = os.path.join(sft_dir, "final"), os.path.join(sft_dir, "settings.json")
    settings = dc.sft_settings()
    if os.path.isdir(final) and os.path.exists(stamp) and json.load(open(stamp)) == settings:
        log(f"rl_demo: reusing the SFT checkpoint {final}")
        _, params = load_checkpoint(final)
        return cfg, params, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(sft_dir, ignore_errors=True)
    os.makedirs(sft_dir)
    tok_dir = os.path.join(dc.out_dir, "tokenizer")
    tok.save_pretrained(tok_dir)
    train_path = os.path.join(dc.out_dir, "train.jsonl")
    addition.write_jsonl(train_path, train)
    run = sft_run_config(dc, sft_dir, train_path, tok_dir, save_every, keep)
    summ = run_sft(run, cfg, build_model(cfg, dc.seed), tok, log=log)
    stopped(summ, "SFT")
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return cfg, summ["state"]["params"], time.perf_counter() - t0


def rl_settings(dc: RLDemoConfig, method: str) -> dict:
    keys = ("seed", "digits", "n_train", "n_test", "eval_k", "hidden", "layers", "heads", "kv_heads", "block_size",
            "sft_steps", "sft_batch", "sft_lr", "sft_warmup", "rl_steps", "prompts_per_step", "group_size", "rl_lr",
            "minibatch", "group_filter", "tau", "budget_m", "temperature", "eval_every", "rl_seed_")
    out = {"method": method, "rule": dc.rule(method), **{k: getattr(dc, k) for k in keys}}
    if dc.sft_schedule != "constant":
        out["sft_schedule"] = dc.sft_schedule
    return out


def rl_objective(dc: RLDemoConfig, method: str):
    """The RL objective of `method` at the demo's K (rows, loss and advantages: the spec defaults)."""
    from dlmjax.rl.config import RLObjectiveConfig

    return RLObjectiveConfig(objective=method, block_size=dc.block_size, group_filter=dc.group_filter, head_rows=0)


def run_method(dc: RLDemoConfig, method: str, model_cfg, params, tok, train: list[dict], eval_fn, log=print) -> dict:
    """One RL run from the SFT params: {"history": per outer step metrics (eval numbers on eval steps), "seconds"}."""
    from dlmjax.rewards.registry import RewardConfig
    from dlmjax.rl.job import RLRunConfig, run_rl
    from dlmjax.train.config import OptimConfig, StepConfig
    from dlmjax.train.loop import LoopConfig

    wd = os.path.join(dc.out_dir, f"rl_{method}")
    path, settings = os.path.join(wd, "history.json"), rl_settings(dc, method)
    if os.path.exists(path):
        got = json.load(open(path))
        if got["settings"] == settings and got.get("status") == "done":
            log(f"rl_demo: reusing the finished {method} run ({path})")
            return got
    shutil.rmtree(wd, ignore_errors=True)
    samples = [{"prompt_ids": prompt_ids(tok, r), "answer": r["answer"]} for r in train]
    run = RLRunConfig(
        loop=LoopConfig(workdir=wd, steps=dc.rl_steps, log_every=1, save_every=dc.rl_steps, keep=1, resume=False,
                        export=False, tensorboard=False, async_save=False),
        objective=rl_objective(dc, method),
        rollout=decoder(dc, dc.rule(method), tok),
        reward=RewardConfig(kind="addition", workers=0),
        optim=OptimConfig(lr=dc.rl_lr, total_steps=1_000_000, schedule="constant"),
        step=StepConfig(global_batch=dc.minibatch, seed=dc.rl_seed_),
        prompts_per_step=dc.prompts_per_step, group_size=dc.group_size, max_prompt_len=dc.prompt_len)
    t0 = time.perf_counter()
    summ = run_rl(run, model_cfg, params, samples, detokenizer(tok), tok.pad_token_id, log=log, eval_fn=eval_fn,
                  eval_every=dc.eval_every)
    stopped(summ, f"RL {method}")
    hist = summ["history"]
    out = {"settings": settings, "history": hist, "seconds": time.perf_counter() - t0, "status": summ["status"]}
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the table and the figure

def curves(base: dict, hist: list[dict]) -> dict:
    """Held-out points (step 0 = the SFT checkpoint at 0 rows) and the training reward per outer step."""
    ev = [{"step": 0, "rows": 0.0, **base}] + [
        {"step": h["step"], "rows": h["rows_total"], **{k: h[k] for k in base}} for h in hist if f"acc_{EVAL_RULES[0]}" in h]
    return {"eval": ev, "reward": [(h["rollouts_total"], h["reward"]) for h in hist]}


def summarize(dc: RLDemoConfig, base: dict, runs: dict) -> tuple[list[dict], str]:
    """One table row per method and the markdown table."""
    main = f"acc_{EVAL_RULES[0]}"  # rows-to-target reads the tau-budget held-out accuracy
    cur = {m: curves(base, r["history"]) for m, r in runs.items()}
    target = max(p[main] for p in cur["tracerl"]["eval"][1:]) if "tracerl" in cur else None
    # a level every method reaches (the lowest of the methods' best accuracies): a rows-to-target that a single lucky
    # evaluation point of TraceRL cannot leave undefined for the others
    common = min(max(p[main] for p in c["eval"][1:]) for c in cur.values())
    first = lambda m, level: next((p["rows"] for p in cur[m]["eval"][1:] if p[main] >= level), None)  # noqa: E731
    rows = []
    for m, r in runs.items():
        h = r["history"]
        trained = [x for x in h if x["rows"] > 0]
        kept_rollouts = sum(x["groups_kept"] * dc.group_size for x in trained)
        reach = first(m, target) if target is not None else None
        last = cur[m]["eval"][-1]
        rows.append({
            "method": m, "rollout_rule": dc.rule(m),
            "rows_per_rollout": float(sum(x["rows"] for x in trained) / max(kept_rollouts, 1)),
            "rows_total": float(h[-1]["rows_total"]), "rows_to_target": reach,
            "rows_to_common": first(m, common), "common_level": common,
            **{f"final_{k}": last[k] for k in base},
            "best_tau_budget": max(p[main] for p in cur[m]["eval"][1:]),
            "train_tpf": float(np.mean([x["tpf"] for x in h])),
            "train_ewc_step": float(np.mean([x["ewc_per_step"] for x in h])),
            "mask_ratio": float(np.mean([x["mask_ratio"] for x in trained])) if trained else float("nan"),
            "groups_kept": float(np.mean([x["groups_kept"] for x in h])),
            "first_reward": h[0]["reward"], "last_reward": float(np.mean([x["reward"] for x in h[-5:]])),
            "seconds": r["seconds"]})
    slim = next((x for x in rows if x["method"] == "slim"), None)
    tr = next((x for x in rows if x["method"] == "tracerl"), None)
    ratio = (slim["rows_to_target"] / tr["rows_to_target"]) if slim and tr and slim["rows_to_target"] and \
        tr["rows_to_target"] else None
    ratio_common = (slim["rows_to_common"] / tr["rows_to_common"]) if slim and tr else None
    f = lambda v, p=3: "—" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"SFT checkpoint (before RL): held-out acc tau-budget {base['acc_tau_budget']:.3f} / dynamic "
             f"{base['acc_dynamic']:.3f}; TPF {base['tpf_tau_budget']:.2f} / {base['tpf_dynamic']:.2f}; EWC per "
             f"step {base['ewc_step_tau_budget']:.3f} / {base['ewc_step_dynamic']:.3f}", "",
             "| method | rollout decoder | rows / rollout | rows total | rows to TraceRL's best (tau-budget acc "
             f"{f(target)}) | rows to the common level ({common:.3f}) | final acc tau-budget | final acc dynamic | best acc tau-budget | train reward first "
             "-> last 5 | TPF (train rollouts) | EWC / step (train rollouts) | mask ratio | groups kept / step | "
             "wall s |", "|" + "---|" * 15]
    for x in rows:
        lines.append(
            f"| {x['method']} | {x['rollout_rule']} | {f(x['rows_per_rollout'], 2)} | {x['rows_total']:.0f} | "
            f"{f(x['rows_to_target'], 0) if x['rows_to_target'] is not None else 'not reached'} | "
            f"{f(x['rows_to_common'], 0)} | "
            f"{x['final_acc_tau_budget']:.3f} | {x['final_acc_dynamic']:.3f} | {x['best_tau_budget']:.3f} | "
            f"{x['first_reward']:.3f} -> {x['last_reward']:.3f} | {x['train_tpf']:.2f} | {x['train_ewc_step']:.3f} | "
            f"{x['mask_ratio']:.3f} | {x['groups_kept']:.1f} | {x['seconds']:.0f} |")
    lines += ["", f"SLIM/TraceRL rows to reach TraceRL's best: {f(ratio, 2)}; to reach the common level "
              f"{common:.3f}: {f(ratio_common, 2)}",
              "Held-out decoders (both at T = 1, avg@{k} on {n} problems), final policy: TPF tau-budget / dynamic, "
              "EWC per step tau-budget / dynamic:".format(k=dc.eval_k, n=dc.n_test)]
    for x in rows:
        lines.append(f"- {x['method']}: TPF {x['final_tpf_tau_budget']:.2f} / {x['final_tpf_dynamic']:.2f}, "
                     f"EWC per step {x['final_ewc_step_tau_budget']:.3f} / {x['final_ewc_step_dynamic']:.3f}")
    return rows, "\n".join(lines), {"tracerl_best": ratio, "common": ratio_common}


def plot(dc: RLDemoConfig, base: dict, runs: dict, stem: str):
    """PNG + SVG, each written under a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"slim": "tab:blue", "tracerl": "tab:orange", "random": "tab:green", "coupled": "tab:red"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, r in runs.items():
        c = curves(base, r["history"])
        xs = [p["rows"] for p in c["eval"]]
        a.plot(xs, [p["acc_tau_budget"] for p in c["eval"]], "-o", color=colors.get(m), label=f"{m} (tau-budget)")
        a.plot(xs, [p["acc_dynamic"] for p in c["eval"]], "--x", color=colors.get(m), alpha=0.6,
               label=f"{m} (dynamic)")
        rx, ry = zip(*c["reward"])
        k = 5
        smooth = np.convolve(ry, np.ones(k) / k, mode="valid") if len(ry) >= k else np.asarray(ry)
        b.plot(rx, ry, color=colors.get(m), alpha=0.25)
        b.plot(rx[len(rx) - len(smooth):], smooth, color=colors.get(m), label=m)
    a.set_xlabel("cumulative training rows")
    a.set_ylabel(f"held-out accuracy (avg@{dc.eval_k}, T = 1)")
    a.set_title("held-out accuracy vs training rows")
    a.legend(fontsize=7)
    b.set_xlabel("rollouts")
    b.set_ylabel("training reward (mean; 5-step moving average)")
    b.set_title("training reward vs rollouts")
    b.legend(fontsize=8)
    fig.suptitle(f"RL demo: tiny SDAR, {dc.digits}-digit addition, K = {dc.block_size}, {dc.prompts_per_step} prompts "
                 f"x G {dc.group_size}, lr {dc.rl_lr:g}, seed {dc.seed} (RL {dc.rl_seed_})" +
                 ("" if dc.sft_schedule == "constant" else f", SFT {dc.sft_steps} steps {dc.sft_schedule} LR"),
                 fontsize=9)
    fig.tight_layout()
    for ext in ("png", "svg"):
        tmp = f"{stem}.partial.{ext}"
        fig.savefig(tmp, format=ext, dpi=120)
        os.replace(tmp, f"{stem}.{ext}")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------

def run_rl_demo(dc: RLDemoConfig, log=print) -> dict:
    """SFT once, then each method's RL run with periodic held-out evaluation; the table, the figure, results.json."""
    from dlmjax.data import addition

    t0 = time.perf_counter()
    os.makedirs(dc.out_dir, exist_ok=True)
    tok = addition.make_tokenizer()
    train, test = make_data(dc)
    log(f"rl_demo: {len(train)} training / {len(test)} held-out {dc.digits}-digit problems, prompt "
        f"{dc.prompt_len} tokens, response {dc.response_len}, K = {dc.block_size}")
    cfg, params, t_sft = sft(dc, tok, train, log)
    eval_fn = make_eval(dc, cfg, tok, test)
    t1 = time.perf_counter()
    base = eval_fn(0, params)
    t_eval = time.perf_counter() - t1
    log(f"rl_demo: SFT checkpoint: {json.dumps({k: round(v, 4) for k, v in base.items()})} (eval {t_eval:.0f} s)")
    runs = {}
    for m in dc.methods:
        log(f"rl_demo: --- {m} (rollouts: {dc.rule(m)}) ---")
        runs[m] = run_method(dc, m, cfg, params, tok, train, eval_fn, log)
        ev = [h for h in runs[m]["history"] if "acc_tau_budget" in h]
        log(f"rl_demo: {m}: held-out acc tau-budget " + " -> ".join(
            [f"{base['acc_tau_budget']:.3f}"] + [f"{h['acc_tau_budget']:.3f}" for h in ev]) +
            f"; {runs[m]['seconds']:.0f} s")
    rows, table, ratio = summarize(dc, base, runs)
    stem = os.path.join(dc.out_dir, "rl_demo")
    plot(dc, base, runs, stem)
    with open(os.path.join(dc.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    res = {"config": dataclasses.asdict(dc), "sft": base, "rows": rows, "slim_over_tracerl_rows": ratio,
           "sft_seconds": t_sft, "eval_seconds": t_eval, "total_seconds": time.perf_counter() - t0,
           "curves": {m: curves(base, r["history"]) for m, r in runs.items()}}
    with open(os.path.join(dc.out_dir, "results.json.partial"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(dc.out_dir, "results.json.partial"), os.path.join(dc.out_dir, "results.json"))
    log("\n" + table)
    log(f"rl_demo: SFT {t_sft:.0f} s, total {res['total_seconds']:.0f} s; figure {stem}.png / .svg; table "
        f"{os.path.join(dc.out_dir, 'table.md')}")
    return res
