"""The training job family's flags (`--job=sft`, `--job=demo`) and their mapping into frozen configs: `SFTRunConfig`
(train/sft.py) and `DemoConfig` (demo.py). The runners only build the configs, load what the job needs and call it."""

from __future__ import annotations

from absl import app, flags

from dlmjax.launch.common_flags import F, require, require_dir, require_writable_dir, usage

# --- demo -----------------------------------------------------------------------------------------------------------
flags.DEFINE_integer("train_steps", None, "demo / sft: optimizer steps (sft: or use --epochs).", lower_bound=1)
flags.DEFINE_integer("demo_digits", 3, "demo: operand digits of the synthetic addition task.", lower_bound=1)
# --- sft: model + data ----------------------------------------------------------------------------------------------
flags.DEFINE_integer("epochs", None, "sft: passes over the data (alternative to --train_steps).", lower_bound=1)
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
flags.DEFINE_float("p_high", 0.95, "sft (trims): mask probability of future (easier) tokens.")
flags.DEFINE_float("p_low", 0.05, "sft (trims): mask probability of context (harder) tokens.")
flags.DEFINE_float("rho", 0.5, "sft (trims): fraction of rows with trajectory masking (lost in the paper; see "
                               "BUILD_NOTES).")
flags.DEFINE_enum("trims_k_range", "zero", ("zero", "one"), "sft (trims): stage k ~ U{0..K-1} (zero) or U{1..K}.")
flags.DEFINE_enum("trims_weight", "inv_p", ("inv_p", "uniform", "t_eff"), "sft (trims): weight on trajectory rows.")
# --- sft: optimizer, step, mesh, LoRA, checkpoints ------------------------------------------------------------------
flags.DEFINE_float("lr", 1e-4, "sft / demo: peak learning rate.")
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
flags.DEFINE_bool("distributed", False, "sft / rl: jax.distributed.initialize() first (TPU pod slices / SLURM "
                                        "auto-detect; --coordinator etc. for explicit set-ups).")
flags.DEFINE_string("coordinator", None, "sft / rl: coordinator host:port for --distributed.")
flags.DEFINE_integer("num_processes", None, "sft / rl: processes for --distributed.")
flags.DEFINE_integer("process_id", None, "sft / rl: this process's id for --distributed.")

SFT_FLAGS = ("workdir", "train_steps", "init_ckpt", "data", "max_length", "epochs", "truncation", "skip_malformed",
             "param_dtype", "compute_dtype", "remat", "objective", "time_eps", "mask_schedule", "loss_weight",
             "cart_p", "loss_norm", "antithetic", "ce_chunk", "head_rows", "bd3lm_block", "block_noise", "num_buckets",
             "p_high", "p_low", "rho", "trims_k_range", "trims_weight", "lr", "warmup_ratio", "lr_schedule",
             "end_lr_ratio", "weight_decay", "clip_norm", "adam_b1", "adam_b2", "adam_eps", "grad_accum", "mesh_data",
             "mesh_fsdp", "mesh_tensor", "lora_rank", "lora_alpha", "lora_targets", "log_every", "save_every", "keep",
             "resume", "export", "tensorboard", "stop_at", "distributed", "coordinator", "num_processes",
             "process_id", "batch_size", "seed", "chat_template")
DEMO_FLAGS = ("workdir", "train_steps", "demo_digits", "seed", "batch_size", "lr")


# --- demo -----------------------------------------------------------------------------------------------------------
def demo_config():
    from dlmjax.demo import DemoConfig

    kw = {"workdir": F.workdir or "runs/demo", "seed": F.seed, "max_digits": F.demo_digits}
    if F.train_steps:
        kw["steps"] = F.train_steps
    if F["batch_size"].present:
        kw["batch_size"] = F.batch_size
    if F["lr"].present:
        kw["lr"] = F.lr
    return usage(lambda: DemoConfig(**kw).check_data())


def run_demo() -> int:
    from dlmjax.demo import run_demo as demo

    res = demo(demo_config())
    return 0 if max(r["accuracy"] for r in res["rows"]) > 0 else 1


# --- the pieces every training job shares (sft today; rl reads the same optimizer / mesh / LoRA / loop flags) ------
def loop_config(steps: int):
    from dlmjax.train.loop import LoopConfig

    return LoopConfig(workdir=F.workdir, steps=steps, log_every=F.log_every, save_every=F.save_every, keep=F.keep,
                      resume=F.resume, export=F.export, tensorboard=F.tensorboard, stop_at=F.stop_at)


def optim_config(steps: int):
    from dlmjax.train.config import OptimConfig

    return OptimConfig(lr=F.lr, total_steps=steps, warmup_steps=int(round(F.warmup_ratio * steps)),
                       end_lr_ratio=F.end_lr_ratio, schedule=F.lr_schedule, b1=F.adam_b1, b2=F.adam_b2,
                       eps=F.adam_eps, weight_decay=F.weight_decay, clip_norm=F.clip_norm)


def step_config(global_batch: int):
    from dlmjax.train.config import StepConfig

    return StepConfig(global_batch=global_batch, grad_accum=F.grad_accum, seed=F.seed)


def mesh_config():
    from dlmjax.train.config import MeshConfig

    return MeshConfig(data=F.mesh_data, fsdp=F.mesh_fsdp, tensor=F.mesh_tensor)


def lora_config():
    from dlmjax.train.config import LoRAConfig

    return LoRAConfig(rank=F.lora_rank, alpha=F.lora_alpha, targets=tuple(F.lora_targets))


# --- sft ------------------------------------------------------------------------------------------------------------
def sft_configs(n_examples_fn):
    """The run's `SFTRunConfig`; `n_examples_fn()` counts the usable examples (only called for --epochs)."""
    from dlmjax.data.pipeline import SFTDataConfig, num_steps
    from dlmjax.train.config import ObjectiveConfig
    from dlmjax.train.sft import SFTRunConfig

    require(("init_ckpt", "data", "workdir"), "sft")
    if bool(F.train_steps) == bool(F.epochs):
        raise app.UsageError("--job=sft needs exactly one of --train_steps and --epochs")
    if F.coordinator and not F.distributed:
        raise app.UsageError("--coordinator needs --distributed")

    def build():
        batch = F.batch_size
        steps = F.train_steps or num_steps(n_examples_fn(), batch, F.epochs)
        return SFTRunConfig(
            loop=loop_config(steps),
            data=SFTDataConfig(path=F.data, max_length=F.max_length, global_batch_size=batch, seed=F.seed,
                               truncation=F.truncation, skip_malformed=F.skip_malformed,
                               chat_template=F.chat_template, pad_bucket=F.num_buckets),
            objective=ObjectiveConfig(kind=F.objective, time_eps=F.time_eps, schedule=F.mask_schedule,
                                      weight=F.loss_weight or "scheduler", cart_p=F.cart_p, norm=F.loss_norm,
                                      antithetic=F.antithetic, ce_chunk=F.ce_chunk, head_rows=F.head_rows,
                                      block_size=F.bd3lm_block, block_noise=F.block_noise,
                                      num_buckets=F.num_buckets, p_high=F.p_high, p_low=F.p_low, rho=F.rho,
                                      k_range=F.trims_k_range, trims_weight=F.trims_weight),
            optim=optim_config(steps), step=step_config(batch), mesh=mesh_config(), lora=lora_config(),
            tokenizer_dir=F.init_ckpt)

    return usage(build)


def check_machine(mc):
    """The mesh flags must fit this machine's devices (checked before any work; exit code 2, the flags named)."""
    import jax

    try:
        mc.shape(jax.device_count())
    except ValueError as e:
        raise app.UsageError(f"--mesh_data={F.mesh_data} --mesh_fsdp={F.mesh_fsdp} --mesh_tensor={F.mesh_tensor}: "
                             f"{e}", exitcode=2) from None


def initialize_distributed():
    """--distributed: jax.distributed.initialize() (auto-detect, or --coordinator / --num_processes / --process_id)."""
    import jax

    if not F.distributed:
        return
    kw = {}
    if F.coordinator:
        kw = dict(coordinator_address=F.coordinator, num_processes=F.num_processes, process_id=F.process_id)
    jax.distributed.initialize(**kw)


def run_sft() -> int:
    import dataclasses
    import functools

    from transformers import AutoTokenizer

    from dlmjax.checkpoint import load_checkpoint
    from dlmjax.data.pipeline import SFTDataConfig, build_examples
    from dlmjax.train.sft import run_sft as sft

    initialize_distributed()

    @functools.lru_cache(maxsize=None)
    def tokenizer():
        require_dir("init_ckpt", F.init_ckpt)
        return AutoTokenizer.from_pretrained(F.init_ckpt)

    def count():  # usable examples, for --epochs
        cfg = SFTDataConfig(path=F.data, max_length=F.max_length, global_batch_size=F.batch_size,
                            truncation=F.truncation, skip_malformed=F.skip_malformed, chat_template=F.chat_template)
        return len(build_examples(cfg, tokenizer())[0])

    run = sft_configs(count)
    check_machine(run.mesh)
    require_writable_dir("workdir", F.workdir)
    tok = tokenizer()
    cfg, params = load_checkpoint(F.init_ckpt, dtype=F.param_dtype, compute_dtype=F.compute_dtype, remat=F.remat)
    if F.loss_weight is None and cfg.family == "dream":  # dLLM's DreamTrainer default
        run = usage(lambda: dataclasses.replace(run, objective=dataclasses.replace(run.objective, weight="cart")))
    sft(run, cfg, params, tok)
    return 0
