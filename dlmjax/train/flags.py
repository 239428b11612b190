"""absl flags of the training-side jobs (demo, sft, trims_score, eval) and their mapping into frozen configs.

Imported by dlmjax.launch only: flags live at the launcher edge; everything below it takes config dataclasses.
"""

from __future__ import annotations

from absl import app, flags

F = flags.FLAGS

# --- demo -----------------------------------------------------------------------------------------------------------
flags.DEFINE_string("workdir", None, "demo / sft / eval: output directory (demo default runs/demo; sft: checkpoints/, "
                                     "tb/ and final/ go here; eval: one JSONL per decoder + table.md).")
flags.DEFINE_integer("train_steps", None, "demo / sft: optimizer steps (sft: or use --epochs).", lower_bound=1)
flags.DEFINE_integer("demo_digits", 3, "demo: operand digits of the synthetic addition task.", lower_bound=1)
# --- sft: model + data ----------------------------------------------------------------------------------------------
flags.DEFINE_string("init_ckpt", None, "sft: dlmjax checkpoint to fine-tune (python -m convert import ...); its "
                                       "tokenizer files are used for the data.")
flags.DEFINE_string("data", None, "sft / trims_score: JSONL of {prompt, response} or {messages} records; eval: "
                                  "JSONL of {prompt, answer}.")
flags.DEFINE_integer("max_length", 1024, "sft / trims_score: tokens per training row L (static; right-padded with "
                                         "trained EOS).", lower_bound=2)
flags.DEFINE_integer("epochs", None, "sft: passes over the data (alternative to --train_steps).", lower_bound=1)
flags.DEFINE_enum("truncation", "right", ("right", "filter"), "sft: right = clip long rows (drop if the prompt fills "
                  "L); filter = drop rows longer than L (dLLM's options).")
flags.DEFINE_bool("skip_malformed", False, "sft: skip (and count) malformed data lines instead of failing.")
flags.DEFINE_enum("param_dtype", "float32", ("float32", "bfloat16"), "sft: master weight dtype.")
flags.DEFINE_enum("compute_dtype", "float32", ("float32", "bfloat16"), "sft: activation / matmul dtype.")
flags.DEFINE_enum("remat", "dots", ("none", "full", "dots"), "sft: activation checkpointing of each layer (dots: "
                  "keep matmul outputs, recompute the rest; 4.4 vs 14.9 GiB temp at 8x512 on SmolLM2-135M, no "
                  "slower).")
# --- sft: objective -------------------------------------------------------------------------------------------------
flags.DEFINE_enum("objective", "mdlm", ("mdlm", "bd3lm", "trims"), "sft: training objective.")
flags.DEFINE_float("time_eps", 1e-3, "sft: t = eps + (1 - eps) U[0,1).")
flags.DEFINE_enum("mask_schedule", "linear", ("linear", "cosine"), "sft: alpha(t) schedule.")
flags.DEFINE_enum("loss_weight", None, ("scheduler", "uniform", "cart"), "sft: per-token weight (default: cart for "
                  "Dream as dLLM's DreamTrainer, else scheduler = 1/t).")
flags.DEFINE_float("cart_p", 0.3, "sft: CART geometric p.")
flags.DEFINE_enum("loss_norm", "token", ("token", "sequence", "batch"), "sft: normalisation of a micro-batch loss "
                  "(dLLM default token; LLaDA's recipe = sequence).")
flags.DEFINE_bool("antithetic", False, "sft: stratified (antithetic) times across the batch (md4).")
flags.DEFINE_integer("ce_chunk", 0, "sft: LM head + CE over sequence chunks of this size (0 = whole sequence); "
                     "the dense head's memory bound, used where --head_rows does not apply.", lower_bound=0)
flags.DEFINE_integer("head_rows", 512, "sft: LM head + CE only at the masked positions, in chunks of this many "
                     "(chunks with none skipped); applies when the batch is not split over devices. 0 = every "
                     "position.", lower_bound=0)
flags.DEFINE_integer("bd3lm_block", 32, "sft (bd3lm): block size of the block-diffusion mask.", lower_bound=1)
flags.DEFINE_enum("block_noise", "sequence", ("sequence", "block"), "sft (bd3lm): one t per row (dLLM) or per "
                  "block (SDAR / BD3-LM).")
flags.DEFINE_integer("num_buckets", 8, "sft (trims) / trims_score: difficulty buckets K.", lower_bound=2)
flags.DEFINE_float("p_high", 0.95, "sft (trims): mask probability of future (easier) tokens.")
flags.DEFINE_float("p_low", 0.05, "sft (trims): mask probability of context (harder) tokens.")
flags.DEFINE_float("rho", 0.5, "sft (trims): fraction of rows with trajectory masking (lost in the paper; see "
                               "BUILD_NOTES).")
flags.DEFINE_enum("trims_k_range", "zero", ("zero", "one"), "sft (trims): stage k ~ U{0..K-1} (zero) or U{1..K}.")
flags.DEFINE_enum("trims_weight", "inv_p", ("inv_p", "uniform", "t_eff"), "sft (trims): weight on trajectory rows.")
# --- sft: optimizer, step, mesh, LoRA, checkpoints ------------------------------------------------------------------
flags.DEFINE_float("lr", 1e-4, "sft: peak learning rate.")
flags.DEFINE_float("warmup_ratio", 0.03, "sft: linear warmup as a fraction of the steps.")
flags.DEFINE_enum("lr_schedule", "cosine", ("cosine", "linear", "constant"), "sft: decay after warmup.")
flags.DEFINE_float("end_lr_ratio", 0.0, "sft: final lr / peak lr.")
flags.DEFINE_float("weight_decay", 0.0, "sft: AdamW decoupled weight decay (matrices only).")
flags.DEFINE_float("clip_norm", 1.0, "sft: global gradient-norm clip (0 = off).")
flags.DEFINE_float("adam_b1", 0.9, "sft: AdamW beta1.")
flags.DEFINE_float("adam_b2", 0.999, "sft: AdamW beta2.")
flags.DEFINE_float("adam_eps", 1e-8, "sft: AdamW epsilon.")
flags.DEFINE_integer("grad_accum", 1, "sft: micro-batches per optimizer step.", lower_bound=1)
flags.DEFINE_integer("mesh_data", -1, "sft: data-parallel axis size (-1 = the remaining devices).")
flags.DEFINE_integer("mesh_fsdp", 1, "sft: FSDP axis size.")
flags.DEFINE_integer("mesh_tensor", 1, "sft: tensor-parallel axis size.")
flags.DEFINE_integer("lora_rank", 0, "sft: LoRA rank on every linear layer (0 = full fine-tuning).", lower_bound=0)
flags.DEFINE_float("lora_alpha", 64.0, "sft: LoRA alpha (scale alpha / rank).")
flags.DEFINE_list("lora_targets", ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"], "sft: adapted weights.")
flags.DEFINE_integer("log_every", 10, "sft: metrics every N steps (one host sync per N steps).", lower_bound=1)
flags.DEFINE_integer("save_every", 500, "sft: checkpoint every N steps.", lower_bound=1)
flags.DEFINE_integer("keep", 2, "sft: checkpoints kept.", lower_bound=1)
flags.DEFINE_bool("resume", True, "sft: continue from the last checkpoint in --workdir.")
flags.DEFINE_bool("export", True, "sft: write <workdir>/final (dlmjax checkpoint, LoRA merged) at the end.")
flags.DEFINE_bool("tensorboard", True, "sft: TensorBoard event file under <workdir>/tb.")
flags.DEFINE_integer("stop_at", 0, "sft: save and leave after this step (as a preemption would).", lower_bound=0)
flags.DEFINE_bool("distributed", False, "sft: jax.distributed.initialize() first (TPU pod slices / SLURM auto-detect; "
                                        "--coordinator etc. for explicit set-ups).")
flags.DEFINE_string("coordinator", None, "sft: coordinator host:port for --distributed.")
flags.DEFINE_integer("num_processes", None, "sft: processes for --distributed.")
flags.DEFINE_integer("process_id", None, "sft: this process's id for --distributed.")
# --- trims_score ----------------------------------------------------------------------------------------------------
flags.DEFINE_string("teacher_ckpt", None, "trims_score: converted AR teacher (Qwen3 / Llama; causal).")
flags.DEFINE_string("student_tokenizer", None, "trims_score: directory of the student's tokenizer (e.g. the student "
                                               "checkpoint).")
flags.DEFINE_enum("bucket_order", "descending", ("descending", "ascending", "random"), "trims_score: hardest tokens "
                  "in bucket 1 (descending, the paper's default) or the ablations.")
flags.DEFINE_enum("difficulty", "nll", ("nll", "entropy"), "trims_score: teacher difficulty metric.")
flags.DEFINE_integer("teacher_max_length", 4096, "trims_score: cap of the teacher's input length.", lower_bound=8)
# --- eval -----------------------------------------------------------------------------------------------------------
flags.DEFINE_enum("scorer", "exact", ("addition", "exact", "math", "boxed"), "eval: how a completion is checked "
                  "against the answer (math: math-verify on the whole completion; boxed: the RL math reward, the "
                  "last \\boxed{} vs the answer).")
flags.DEFINE_list("rules", None, "eval: comma list of commit rules of --decoder, one table row each "
                                 "(default: --rule).")

TRAIN_FLAGS = ("workdir", "train_steps", "init_ckpt", "data", "max_length", "epochs", "truncation", "skip_malformed",
               "param_dtype", "compute_dtype", "remat", "objective", "time_eps", "mask_schedule", "loss_weight",
               "cart_p", "loss_norm", "antithetic", "ce_chunk", "head_rows", "bd3lm_block", "block_noise", "num_buckets", "p_high",
               "p_low", "rho", "trims_k_range", "trims_weight", "lr", "warmup_ratio", "lr_schedule", "end_lr_ratio",
               "weight_decay", "clip_norm", "adam_b1", "adam_b2", "adam_eps", "grad_accum", "mesh_data", "mesh_fsdp",
               "mesh_tensor", "lora_rank", "lora_alpha", "lora_targets", "log_every", "save_every", "keep", "resume",
               "export", "tensorboard", "stop_at", "distributed", "coordinator", "num_processes", "process_id",
               "batch_size", "seed", "chat_template")
TRIMS_SCORE_FLAGS = ("init_ckpt", "data", "max_length", "truncation", "skip_malformed", "chat_template", "out",
                     "teacher_ckpt", "student_tokenizer", "bucket_order", "difficulty", "teacher_max_length",
                     "num_buckets", "batch_size", "seed")
DEMO_FLAGS = ("workdir", "train_steps", "demo_digits", "seed", "batch_size", "lr")
EVAL_FLAGS = ("ckpt", "data", "workdir", "scorer", "rules", "batch_size", "seed", "dtype")


def require_dir(flag: str, path: str, what: str = "a checkpoint directory"):
    """A path flag must name an existing directory (else a CheckpointError naming the flag and the path)."""
    import os

    from dlmjax.checkpoint import CheckpointError

    if not os.path.isdir(path):
        raise CheckpointError(f"--{flag}={path}: not {what} (no such directory)")


def _usage(fn):
    try:
        return fn()
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def demo_config():
    from dlmjax.demo import DemoConfig

    kw = {"workdir": F.workdir or "runs/demo", "seed": F.seed, "max_digits": F.demo_digits}
    if F.train_steps:
        kw["steps"] = F.train_steps
    if F["batch_size"].present:
        kw["batch_size"] = F.batch_size
    if F["lr"].present:
        kw["lr"] = F.lr
    return _usage(lambda: DemoConfig(**kw))


def _initialize_distributed():
    import jax

    if not F.distributed:
        return
    kw = {}
    if F.coordinator:
        kw = dict(coordinator_address=F.coordinator, num_processes=F.num_processes, process_id=F.process_id)
    jax.distributed.initialize(**kw)


def sft_configs(n_examples_fn):
    """(job, data, objective, optim, step, mesh, lora) configs; `n_examples_fn()` counts examples for --epochs."""
    from dlmjax.data.pipeline import SFTDataConfig, num_steps
    from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
    from dlmjax.train.sft import SFTJobConfig

    for name in ("init_ckpt", "data", "workdir"):
        if not F[name].value:
            raise app.UsageError(f"--{name} is required for --job=sft")
    if bool(F.train_steps) == bool(F.epochs):
        raise app.UsageError("--job=sft needs exactly one of --train_steps and --epochs")
    if F.coordinator and not F.distributed:
        raise app.UsageError("--coordinator needs --distributed")

    def build():
        batch = F.batch_size
        steps = F.train_steps or num_steps(n_examples_fn(), batch, F.epochs)
        data = SFTDataConfig(path=F.data, max_length=F.max_length, global_batch_size=batch, seed=F.seed,
                             truncation=F.truncation, skip_malformed=F.skip_malformed,
                             chat_template=F.chat_template, pad_bucket=F.num_buckets)
        oc = ObjectiveConfig(kind=F.objective, time_eps=F.time_eps, schedule=F.mask_schedule,
                             weight=F.loss_weight or "scheduler", cart_p=F.cart_p, norm=F.loss_norm,
                             antithetic=F.antithetic, ce_chunk=F.ce_chunk, head_rows=F.head_rows,
                             block_size=F.bd3lm_block,
                             block_noise=F.block_noise, num_buckets=F.num_buckets, p_high=F.p_high, p_low=F.p_low,
                             rho=F.rho, k_range=F.trims_k_range, trims_weight=F.trims_weight)
        opt = OptimConfig(lr=F.lr, total_steps=steps, warmup_steps=int(round(F.warmup_ratio * steps)),
                          end_lr_ratio=F.end_lr_ratio, schedule=F.lr_schedule, b1=F.adam_b1, b2=F.adam_b2,
                          eps=F.adam_eps, weight_decay=F.weight_decay, clip_norm=F.clip_norm)
        job = SFTJobConfig(workdir=F.workdir, steps=steps, log_every=F.log_every, save_every=F.save_every,
                           keep=F.keep, resume=F.resume, export=F.export, tensorboard=F.tensorboard,
                           stop_at=F.stop_at)
        return (job, data, oc, opt, StepConfig(global_batch=batch, grad_accum=F.grad_accum, seed=F.seed),
                MeshConfig(data=F.mesh_data, fsdp=F.mesh_fsdp, tensor=F.mesh_tensor),
                LoRAConfig(rank=F.lora_rank, alpha=F.lora_alpha, targets=tuple(F.lora_targets)))

    return _usage(build)


def run_sft_job() -> int:
    import dataclasses
    import functools

    from transformers import AutoTokenizer

    from dlmjax.checkpoint import load_checkpoint
    from dlmjax.data.pipeline import SFTDataConfig, build_examples
    from dlmjax.train.sft import run_sft

    _initialize_distributed()

    @functools.lru_cache(maxsize=None)
    def tokenizer():
        require_dir("init_ckpt", F.init_ckpt)
        return AutoTokenizer.from_pretrained(F.init_ckpt)

    def count():
        cfg = SFTDataConfig(path=F.data, max_length=F.max_length, global_batch_size=F.batch_size,
                            truncation=F.truncation, skip_malformed=F.skip_malformed, chat_template=F.chat_template)
        return len(build_examples(cfg, tokenizer())[0])

    job, data, oc, opt, sc, mc, lc = sft_configs(count)
    tok = tokenizer()
    cfg, params = load_checkpoint(F.init_ckpt, dtype=F.param_dtype, compute_dtype=F.compute_dtype, remat=F.remat)
    if F.loss_weight is None and cfg.family == "dream":
        oc = dataclasses.replace(oc, weight="cart")  # dLLM's DreamTrainer default
    run_sft(job, cfg, params, tok, data, oc, opt, sc, mc, lc, tokenizer_dir=F.init_ckpt)
    return 0


def run_trims_score_job() -> int:
    from transformers import AutoTokenizer

    from dlmjax.data.sft import read_records, tokenize_record
    from dlmjax.train.trims_score import TrimsScoreConfig, run_trims_score

    for name in ("teacher_ckpt", "data", "out"):
        if not F[name].value:
            raise app.UsageError(f"--{name} is required for --job=trims_score")
    student = F.student_tokenizer or F.init_ckpt
    if not student:
        raise app.UsageError("--job=trims_score needs --student_tokenizer (or --init_ckpt)")
    require_dir("teacher_ckpt", F.teacher_ckpt)
    require_dir("student_tokenizer" if F.student_tokenizer else "init_ckpt", student, "a tokenizer directory")
    cfg = _usage(lambda: TrimsScoreConfig(teacher_ckpt=F.teacher_ckpt, student_tokenizer=student, K=F.num_buckets,
                                          order=F.bucket_order, metric=F.difficulty, batch_size=F.batch_size,
                                          max_length=F.teacher_max_length, seed=F.seed))
    tok = AutoTokenizer.from_pretrained(student)
    records, skipped = read_records(F.data, skip_malformed=F.skip_malformed)
    kept, examples = [], []
    for i, rec in enumerate(records):
        ex = tokenize_record(tok, rec, F.max_length, F.truncation, F.chat_template, where=f"{F.data} record {i}")
        if ex is not None:  # write back the record as it was read (read_records adds "messages" to prompt/response)
            kept.append({k: v for k, v in rec.items() if k != "messages"} if "prompt" in rec else rec)
            examples.append({**ex, "messages": rec["messages"]})
    print(f"trims_score: {len(examples)} examples ({skipped} malformed skipped, {len(records) - len(kept)} dropped "
          "by truncation)")
    run_trims_score(cfg, kept, examples, F.out, pad_to=[ex["full_len"] for ex in examples])
    return 0


def run_eval_job(decode_configs) -> int:
    """decode_configs: the launcher's decoder-flag mapping (passed in: dlmjax.launch runs as __main__)."""
    import dataclasses
    import os

    from dlmjax.evaluate import EvalRun, evaluate, format_table, plot_accuracy_vs_tpf

    for name in ("ckpt", "data", "workdir"):
        if not F[name].value:
            raise app.UsageError(f"--{name} is required for --job=eval")
    _, dc = decode_configs(check_io=False)
    rules = F.rules or [dc.rule if hasattr(dc, "rule") else "default"]
    runs = []
    for r in rules:
        c = _usage(lambda: dataclasses.replace(dc, rule=r))
        runs.append(EvalRun(f"{F.decoder}:{r}", F.decoder, c))
    rows = evaluate(F.ckpt, F.data, runs, F.workdir, scorer=F.scorer, batch_size=F.batch_size, seed=F.seed,
                    dtype=F.dtype, layer_loop=F.layer_loop)
    table = format_table(rows)
    print(table)
    with open(os.path.join(F.workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_accuracy_vs_tpf(rows, os.path.join(F.workdir, "accuracy_vs_tpf"))
    return 0
