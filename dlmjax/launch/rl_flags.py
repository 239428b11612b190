"""--job=rl: SLIM-RL, TraceRL, random masking (and coupled) on a converted SDAR / TraDo checkpoint.

Flags -> one frozen `RLRunConfig` (rl/job.py). The three published recipes are flagfiles in launch/flags/. Defaults are
the issue's table (BUILD_NOTES "RL defaults"): where a shared flag's default is an SFT default (lr 1e-4, cosine
schedule, decode max_new_tokens 128, block 4) and the flag is not given, the RL default applies instead (lr 1e-6,
constant, 256 new tokens, K = S = 16), so `--job=rl` with no tuning flags runs the SLIM-RL math recipe.
Objective, rollout rule and advantage are independent flags, so each component can be ablated.
"""

from __future__ import annotations

from absl import app, flags

from dlmjax.launch import train_flags
from dlmjax.launch.common_flags import F, reject, require, require_dir, usage

flags.DEFINE_enum("rl_objective", "slim", ("slim", "tracerl", "random", "coupled"), "rl: training rows + loss: "
                  "slim = 3 Gauss-Legendre rows per rollout, sequence-level ratio; tracerl = trajectory slices; "
                  "random = one random-mask row; coupled = random + its complement.")
flags.DEFINE_integer("outer_steps", 160, "rl: outer steps (rollouts + updates each).", lower_bound=1)
flags.DEFINE_integer("prompts_per_step", 128, "rl: prompts per outer step.", lower_bound=1)
flags.DEFINE_integer("group_size", 8, "rl: rollouts per prompt (G).", lower_bound=1)
flags.DEFINE_integer("max_prompt_len", 784, "rl: prompts longer than this many tokens are dropped.", lower_bound=1)
flags.DEFINE_enum("prompt_template", "reference", ("reference", "chat", "none"), "rl: reference = the SLIM-RL / "
                  "dLLM-RL Qwen template verbatim (<|im_start|>user ... Please reason step by step ... "
                  "<|im_start|>assistant); chat = the tokenizer's chat template with the same instruction; none = "
                  "the prompt text as is.")
flags.DEFINE_integer("quadrature_points", 3, "rl (slim): Gauss-Legendre nodes = rows per rollout.", lower_bound=1)
flags.DEFINE_float("mask_spread", 0.2, "rl (slim): spread of the per-block mask schedule.")
flags.DEFINE_enum("mask_shape", "cosine", ("cosine", "linear"), "rl (slim): block schedule shape.")
flags.DEFINE_bool("mask_increasing", False, "rl (slim): block 0 least masked (default: most masked).")
flags.DEFINE_integer("shrink", 1, "rl (tracerl): merge each run of this many distinct decoding steps.", lower_bound=1)
flags.DEFINE_float("lower_p", 0.1, "rl (random/coupled): per-token mask probability V ~ U(lower_p, upper_p).")
flags.DEFINE_float("upper_p", 0.9, "rl (random/coupled): see --lower_p.")
flags.DEFINE_enum("is_level", "sequence", ("sequence", "token", "block"), "rl (slim): importance-ratio level.")
flags.DEFINE_float("clip_low", 0.1, "rl (slim): sequence / block ratio clip [1 - low, 1 + high].")
flags.DEFINE_float("clip_high", 0.1, "rl (slim): see --clip_low.")
flags.DEFINE_float("ppo_eps", 0.2, "rl: token-level ratio clip [1 - eps, 1 + eps] (tracerl / random / coupled).")
flags.DEFINE_float("kl_beta", 0.01, "rl: weight of the KL to the rollout policy.")
flags.DEFINE_enum("kl_estimator", "k3", ("k1", "k2", "k3"), "rl: KL estimator.")
flags.DEFINE_enum("advantage", None, ("dr_grpo", "z_score"), "rl: group advantage (default: slim dr_grpo, else "
                  "z_score).")
flags.DEFINE_enum("group_filter", None, ("math", "code", "none"), "rl: math keeps groups with 0.2 <= mean reward <= "
                  "0.8; code drops groups whose advantages are all 0 (default: code for --reward=code, else math).")
flags.DEFINE_enum("block_align", "response", ("response", "absolute"), "rl: training blocks counted from the "
                  "response start (the reference trainers) or at absolute positions (as the decoder sees them).")
flags.DEFINE_enum("reward", "boxed", ("boxed", "exact", "addition", "math", "code"), "rl: boxed = last \\boxed{} vs "
                  "the answer (math); code = unit tests in the bubblewrap sandbox; exact / addition / math as eval.")
flags.DEFINE_enum("math_mode", "math_verify", ("math_verify", "legacy"), "rl (boxed): answer equivalence.")
flags.DEFINE_bool("truncation_penalty", True, "rl (boxed): reward 0 when the response reaches max tokens - 5.")
flags.DEFINE_enum("code_reward", "count", ("count", "fraction"), "rl (code): passed tests or their fraction.")
flags.DEFINE_integer("reward_workers", 2, "rl: reward scoring processes / sandbox workers (0: in process, text "
                     "rewards only).", lower_bound=0)
flags.DEFINE_bool("reset_optimizer", False, "rl: re-initialise AdamW and the LR schedule every outer step, as the "
                  "references do by restarting their trainer.")
# TraceRL's optional diffusion value model (spec §2.6, dlmjax/rl/value.py, docs/rl_value_notes.md)
flags.DEFINE_bool("value_model", False, "rl (tracerl): train TraceRL's diffusion value model (a backbone copy + a "
                  "zero-initialised linear head) and give the policy per-token advantages from it.")
flags.DEFINE_string("value_init_ckpt", None, "rl (--value_model): the value backbone's checkpoint (same "
                    "architecture as --init_ckpt; default: --init_ckpt).")
flags.DEFINE_float("value_lr", 5e-6, "rl (--value_model): the value model's AdamW learning rate.")
flags.DEFINE_float("value_clip", 0.2, "rl (--value_model): value clip, V_old + clip(V - V_old, +-value_clip).")
flags.DEFINE_float("gamma", 1.0, "rl (--value_model): discount over decoding steps.")
flags.DEFINE_float("lam", 1.0, "rl (--value_model): GAE lambda over decoding steps.")
flags.DEFINE_integer("train_value_every", 1, "rl (--value_model): update the value model on every n-th outer step "
                     "(its values are used on every step).", lower_bound=1)
VALUE_FLAGS = ("value_init_ckpt", "value_lr", "value_clip", "gamma", "lam", "train_value_every")

RL_FLAGS = ("workdir", "init_ckpt", "data", "seed", "batch_size", "chat_template", "rl_objective", "outer_steps",
            "prompts_per_step", "group_size", "max_prompt_len", "prompt_template", "quadrature_points", "mask_spread",
            "mask_shape", "mask_increasing", "shrink", "lower_p", "upper_p", "is_level", "clip_low", "clip_high",
            "ppo_eps", "kl_beta", "kl_estimator", "advantage", "group_filter", "block_align", "reward", "math_mode",
            "truncation_penalty", "code_reward", "reward_workers", "reset_optimizer", "head_rows",
            # rollout decoder (SDAR)
            "max_new_tokens", "block_size", "steps", "rule", "tau", "budget_m", "temperature", "top_k", "top_p",
            "conf_dtype", "forbid_mask_token",
            # optimizer / step / mesh / LoRA / loop / precision / multi-host: the SFT job's flags
            "lr", "warmup_ratio", "lr_schedule", "end_lr_ratio", "weight_decay", "clip_norm", "adam_b1", "adam_b2",
            "adam_eps", "grad_accum", "mesh_data", "mesh_fsdp", "mesh_tensor", "lora_rank", "lora_alpha",
            "lora_targets", "log_every", "save_every", "keep", "resume", "export", "tensorboard", "stop_at",
            "param_dtype", "compute_dtype", "remat", "distributed", "coordinator", "num_processes", "process_id")
RL_FLAGS = RL_FLAGS + ("value_model",) + VALUE_FLAGS

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = ("Place your code within a single Python code block ```python ```. Do not include more than one "
                    "code block. ")
STDIO_INSTRUCTION = "You should put your code in ```python ```. Use input() to read input and print() to produce output " \
    "in your script."


def _rl_default(name: str, value):
    """The flag's value when given, else the RL default (shared flags carry SFT / decode defaults)."""
    return F[name].value if F[name].present else value


def rl_config():
    """The run's frozen RLRunConfig."""
    import dataclasses

    from dlmjax.decode.sdar import BlockDecodeConfig
    from dlmjax.rewards.registry import RewardConfig
    from dlmjax.rl.config import RLObjectiveConfig, ValueConfig
    from dlmjax.rl.job import RLRunConfig
    from dlmjax.train.config import OptimConfig

    require(("init_ckpt", "data", "workdir"), "rl")
    if F.coordinator and not F.distributed:
        raise app.UsageError("--coordinator needs --distributed")
    if F.reward == "code" and F.reward_workers < 1:
        raise app.UsageError("--reward=code needs --reward_workers >= 1 (programs run only in the sandbox)")
    if not F.value_model:
        reject(VALUE_FLAGS, "needs --value_model")
    elif F.rl_objective != "tracerl":
        raise app.UsageError(f"--value_model needs --rl_objective=tracerl (TraceRL's value model; its step-level "
                             f"returns follow the trajectory slices), not {F.rl_objective}")

    def build():
        obj = F.rl_objective
        k = _rl_default("block_size", 16)
        rollout = BlockDecodeConfig(
            block_size=k, steps=F.steps or k, max_new_tokens=_rl_default("max_new_tokens", 256),
            rule=F.rule or ("tau_budget" if obj == "slim" else "dynamic"), tau=F.tau, budget_m=F.budget_m,
            temperature=1.0 if F.temperature is None else F.temperature, top_k=F.top_k, top_p=F.top_p,
            conf_dtype=F.conf_dtype or "float32", forbid_mask_token=F.forbid_mask_token)
        rc = RLObjectiveConfig(
            objective=obj, block_size=k, block_align=F.block_align, num_quadrature_points=F.quadrature_points,
            mask_spread=F.mask_spread, mask_shape=F.mask_shape, mask_increasing=F.mask_increasing, shrink=F.shrink,
            lower_p=F.lower_p, upper_p=F.upper_p, level=F.is_level, clip_ratio_low=F.clip_low,
            clip_ratio_high=F.clip_high, eps=F.ppo_eps, beta=F.kl_beta, kl_estimator=F.kl_estimator,
            advantage=F.advantage or "", group_filter=F.group_filter or ("code" if F.reward == "code" else "math"),
            head_rows=F.head_rows)
        steps = F.outer_steps
        optim = OptimConfig(lr=_rl_default("lr", 1e-6), total_steps=steps,
                            warmup_steps=int(round(_rl_default("warmup_ratio", 0.0) * steps)),
                            end_lr_ratio=F.end_lr_ratio, schedule=_rl_default("lr_schedule", "constant"),
                            b1=F.adam_b1, b2=F.adam_b2, eps=F.adam_eps, weight_decay=F.weight_decay,
                            clip_norm=F.clip_norm)
        loop = train_flags.loop_config(steps)
        if not F["save_every"].present:
            loop = dataclasses.replace(loop, save_every=10)  # the references save every 10 steps
        return RLRunConfig(
            loop=loop, objective=rc, rollout=rollout,
            reward=RewardConfig(kind=F.reward, math_mode=F.math_mode, truncation_penalty=F.truncation_penalty,
                                code_reward=F.code_reward, workers=F.reward_workers),
            optim=optim, step=train_flags.step_config(_rl_default("batch_size", 8)), mesh=train_flags.mesh_config(),
            lora=train_flags.lora_config(), prompts_per_step=F.prompts_per_step, group_size=F.group_size,
            max_prompt_len=F.max_prompt_len, reset_optimizer=F.reset_optimizer,
            value=ValueConfig(lr=F.value_lr, clip=F.value_clip, gamma=F.gamma, lam=F.lam,
                              train_every=F.train_value_every) if F.value_model else None)

    return usage(build)


def prompt_text(tokenizer, problem: str, template: str, instruction: str = MATH_INSTRUCTION,
                prefix: str = "") -> tuple[str, bool]:
    """(text, has_special_tokens): the reference's verbatim Qwen template (spec §0.1), the tokenizer's chat template
    with the same instruction, or the problem as is. `prefix` (code tasks) follows the assistant tag."""
    if template == "reference":
        return (f"<|im_start|>user\n{problem}\n{instruction}<|im_end|>\n<|im_start|>assistant\n{prefix}", True)
    if template == "chat":
        msgs = [{"role": "user", "content": f"{problem}\n{instruction}"}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix, True
    return problem + prefix, False


def load_samples(run, tokenizer, log=print) -> list[dict]:
    """The prompts of --data tokenised once (token ids kept for training), longer than max_prompt_len dropped."""
    if run.reward.kind == "code":
        from dlmjax.rewards.code import load_code_tasks

        tasks = load_code_tasks(F.data)
        records = [{"task": t, "prefix": t.prefix if t.test_method == "function" else "",
                    "problem": t.question if t.test_method == "function" else f"This is the problem:\n{t.question}",
                    "stdio": t.test_method == "stdio"} for t in tasks]
    else:
        from dlmjax.rewards.math import read_math_jsonl

        records = [{"answer": r["answer"], "problem": r["prompt"], "prefix": ""} for r in read_math_jsonl(F.data)]
    out, dropped = [], 0
    for r in records:
        instruction = (MATH_INSTRUCTION if run.reward.kind != "code" else STDIO_INSTRUCTION if r.get("stdio")
                       else CODE_INSTRUCTION)
        text, special = prompt_text(tokenizer, r["problem"], F.prompt_template, instruction, r["prefix"])
        ids = tokenizer(text, add_special_tokens=not special)["input_ids"]
        if len(ids) > run.max_prompt_len:
            dropped += 1
            continue
        out.append({**r, "prompt_ids": list(ids)})
    log(f"rl: {len(out)} prompts from {F.data} ({dropped} longer than {run.max_prompt_len} tokens dropped)")
    if not out:
        from dlmjax.data.sft import DataError

        raise DataError(f"{F.data}: no prompt fits --max_prompt_len={run.max_prompt_len}")
    return out


def check_distributed_flags():
    """--distributed and its explicit set-up flags (before jax.distributed.initialize): --coordinator, --num_processes
    and --process_id come together, with --distributed, and the id lies in [0, num_processes)."""
    explicit = {n: F[n].value for n in ("coordinator", "num_processes", "process_id") if F[n].value is not None}
    if explicit and not F.distributed:
        raise app.UsageError(f"--{next(iter(explicit))} needs --distributed")
    if explicit and len(explicit) < 3:
        missing = [n for n in ("coordinator", "num_processes", "process_id") if n not in explicit]
        raise app.UsageError(f"--{next(iter(explicit))} needs --{' and --'.join(missing)} (explicit multi-process "
                             "set-up; give none of them to auto-detect a TPU slice / SLURM job)")
    if explicit and not (F.num_processes >= 1 and 0 <= F.process_id < F.num_processes):
        raise app.UsageError(f"--process_id={F.process_id} must lie in [0, --num_processes={F.num_processes})")


def check_batch_split(run):
    """The mesh must fit the devices of all processes, and each step's rollouts and each minibatch must split over
    its data x fsdp row shards (every process feeds whole shards)."""
    import jax

    train_flags.check_machine(run.mesh)
    data, fsdp, _ = run.mesh.shape(jax.device_count())
    n, b = data * fsdp, run.prompts_per_step * run.group_size
    where = f"the mesh's data x fsdp = {n} row shards ({jax.device_count()} devices, {jax.process_count()} processes)"
    if b % n:
        raise app.UsageError(f"--prompts_per_step={run.prompts_per_step} x --group_size={run.group_size} = {b} "
                             f"rollouts per step do not split over {where}")
    if run.step.global_batch % n:
        raise app.UsageError(f"--batch_size={run.step.global_batch} rows per minibatch do not split over {where}")


def value_backbone(cfg, params):
    """The value model's starting params (--value_model): --value_init_ckpt's, which must have the policy's
    architecture (CheckpointError naming the first differing field), else the policy's own init `params`; None
    without --value_model."""
    if not F.value_model:
        return None
    if not F.value_init_ckpt:
        return params
    import dataclasses

    from dlmjax.checkpoint import CheckpointError, load_checkpoint

    require_dir("value_init_ckpt", F.value_init_ckpt)
    vcfg, vparams = load_checkpoint(F.value_init_ckpt, dtype=F.param_dtype, compute_dtype=F.compute_dtype,
                                    remat=F.remat)
    a, b = dataclasses.asdict(cfg), dataclasses.asdict(vcfg)
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        raise CheckpointError(f"--value_init_ckpt={F.value_init_ckpt}: the value backbone must have the policy's "
                              f"architecture; {diff[0]} is {b.get(diff[0])!r}, the policy's is {a[diff[0]]!r}")
    return vparams


def leave_distributed():
    """After a usage error that every process finds (the same flags, the same devices) once jax.distributed is up:
    leave the distributed service together, so that no process is killed by the service for another's early exit
    before it printed its own error line."""
    import jax

    if F.distributed and jax.process_count() > 1:
        jax.distributed.shutdown()


def run_rl() -> int:
    import dataclasses

    from transformers import AutoTokenizer

    from dlmjax.checkpoint import load_checkpoint
    from dlmjax.checkpoint import CheckpointError
    from dlmjax.rl.job import run_rl as rl
    from dlmjax.train.loop import checkpoint_writer

    check_distributed_flags()
    train_flags.initialize_distributed()
    try:
        run = rl_config()
        check_batch_split(run)
    except app.UsageError:
        leave_distributed()
        raise
    require_dir("init_ckpt", F.init_ckpt)
    tok = AutoTokenizer.from_pretrained(F.init_ckpt)
    cfg, params = load_checkpoint(F.init_ckpt, dtype=F.param_dtype, compute_dtype=F.compute_dtype, remat=F.remat)
    if cfg.mask_token_id is None:
        raise CheckpointError(f"--init_ckpt={F.init_ckpt}: the checkpoint has no mask_token_id; RL needs a "
                              "diffusion (SDAR / TraDo) checkpoint")
    if cfg.family != "sdar":
        raise CheckpointError(f"--init_ckpt={F.init_ckpt}: RL rows use the block-diffusion layout of SDAR / TraDo; "
                              f"this checkpoint is {cfg.family}")
    stops = tuple(sorted({i for i in (tok.eos_token_id, cfg.eos_token_id) if i is not None}))
    run = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, stop_ids=stops))
    samples = load_samples(run, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rl(run, cfg, params, samples, lambda ids: tok.decode(list(ids), skip_special_tokens=False), pad,
       export=checkpoint_writer(F.init_ckpt, tok), value_params=value_backbone(cfg, params))
    return 0
