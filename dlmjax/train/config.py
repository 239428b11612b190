"""Frozen training configs, built once from flags and passed down. Every cross-field check lives in __post_init__
and names the field (the launcher turns the ValueError into a usage error)."""

from __future__ import annotations

import dataclasses

from dlmjax.sharding import MeshConfig  # noqa: F401  (re-exported: the mesh is configured with the run)

OBJECTIVES = ("mdlm", "bd3lm", "trims")


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Masked-diffusion objective. Defaults are dLLM's MDLMTrainer (spec trims_mdlm.md §3.3) and TRIMS §5."""

    kind: str = "mdlm"  # mdlm | bd3lm | trims
    time_eps: float = 1e-3  # t = eps + (1 - eps) * U[0, 1)
    schedule: str = "linear"  # linear: alpha = 1 - t; cosine: alpha = 1 - cos(pi/2 (1 - t))
    weight: str = "scheduler"  # scheduler: -alpha'/(1 - alpha + 1e-6) (1/t linear) | uniform | cart (Dream)
    cart_p: float = 0.3  # CART geometric p (dLLM DreamTrainer "cart[geo_p:0.3]")
    norm: str = "token"  # token | sequence | batch (dLLM loss_norm_type; LLaDA's official recipe = sequence)
    antithetic: bool = False  # md4 stratified times t_b = frac(u + b / B) across the (global) batch
    right_shift: bool | None = None  # Dream's logit shift; None = the model family's default
    ce_chunk: int = 0  # > 0: LM head + CE over sequence chunks of this many tokens (never [B, L, V] f32)
    # > 0: LM head + CE only where the loss needs it: the masked positions of a micro-batch, gathered into chunks of
    # this many rows, chunks with no masked position skipped (batch not sharded over devices; else ce_chunk's path)
    head_rows: int = 512
    # bd3lm (spec §4): [x_t ; x_0] layout, block-diffusion mask
    block_size: int = 32
    block_noise: str = "sequence"  # sequence: one t per row (dLLM) | block: one t per block (SDAR / BD3-LM)
    # trims (spec §5): trajectory masking on a fraction rho of the rows, standard MDLM on the rest
    num_buckets: int = 8
    p_high: float = 0.95
    p_low: float = 0.05
    rho: float = 0.5
    k_range: str = "zero"  # zero: k ~ U{0..K-1} (always >= 1 future bucket) | one: k ~ U{1..K}
    trims_weight: str = "inv_p"  # inv_p: 1/p_i | uniform | t_eff: 1/mean_i(p_i) (cart when weight == cart)

    def __post_init__(self):
        _check(self.kind in OBJECTIVES, f"objective={self.kind!r} is not one of {OBJECTIVES}")
        _check(0.0 <= self.time_eps < 1.0, f"time_eps={self.time_eps} must be in [0, 1)")
        _check(self.schedule in ("linear", "cosine"), f"schedule={self.schedule!r} is not linear | cosine")
        _check(self.weight in ("scheduler", "uniform", "cart"), f"loss_weight={self.weight!r} is not "
               "scheduler | uniform | cart")
        _check(0.0 < self.cart_p <= 1.0, f"cart_p={self.cart_p} must be in (0, 1]")
        _check(self.norm in ("token", "sequence", "batch"), f"loss_norm={self.norm!r} is not token | sequence | batch")
        _check(self.ce_chunk >= 0, f"ce_chunk={self.ce_chunk} must be >= 0")
        _check(self.head_rows >= 0, f"head_rows={self.head_rows} must be >= 0")
        _check(self.block_size > 0, f"block_size={self.block_size} must be positive")
        _check(self.block_noise in ("sequence", "block"), f"block_noise={self.block_noise!r} is not sequence | block")
        _check(self.num_buckets >= 2, f"num_buckets={self.num_buckets} must be >= 2")
        _check(0.0 < self.p_low <= 1.0 and 0.0 < self.p_high <= 1.0,
               f"p_low={self.p_low}, p_high={self.p_high} must be in (0, 1]")
        _check(0.0 <= self.rho <= 1.0, f"rho={self.rho} must be in [0, 1]")
        _check(self.k_range in ("zero", "one"), f"trims_k_range={self.k_range!r} is not zero | one")
        _check(self.trims_weight in ("inv_p", "uniform", "t_eff"), f"trims_weight={self.trims_weight!r} is not "
               "inv_p | uniform | t_eff")
        if self.kind == "bd3lm":
            _check(self.weight != "cart", "loss_weight=cart is Dream's MDLM weighting, not a bd3lm option")
            _check(not self.antithetic or self.block_noise == "sequence",
                   "antithetic time sampling is per row; it does not combine with block_noise=block")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup + cosine decay and global-norm clipping (HF Trainer defaults where TRIMS is silent)."""

    lr: float = 1e-4
    total_steps: int = 1000
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0  # cosine ends at lr * end_lr_ratio
    schedule: str = "cosine"  # cosine | constant | linear
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 = off

    def __post_init__(self):
        _check(self.lr > 0, f"lr={self.lr} must be positive")
        _check(self.total_steps > 0, f"steps={self.total_steps} must be positive")
        _check(0 <= self.warmup_steps <= self.total_steps,
               f"warmup_steps={self.warmup_steps} must be in [0, steps={self.total_steps}]")
        _check(self.schedule in ("cosine", "constant", "linear"), f"lr_schedule={self.schedule!r} is not "
               "cosine | constant | linear")
        _check(0.0 <= self.end_lr_ratio <= 1.0, f"end_lr_ratio={self.end_lr_ratio} must be in [0, 1]")
        _check(self.weight_decay >= 0 and self.clip_norm >= 0, "weight_decay and clip_norm must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (alpha / rank) A @ B on every linear layer of the stack; base frozen. rank 0 = off."""

    rank: int = 0
    alpha: float = 64.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def __post_init__(self):
        _check(self.rank >= 0, f"lora_rank={self.rank} must be >= 0")
        allowed = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
        bad = [t for t in self.targets if t not in allowed]
        _check(not bad, f"lora_targets {bad} are not among {sorted(allowed)}")
        _check(len(self.targets) > 0 or self.rank == 0, "lora_targets is empty")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How one optimizer step runs: micro-batching and precision."""

    global_batch: int = 8
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self):
        _check(self.global_batch > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive")
        _check(self.global_batch % self.grad_accum == 0,
               f"batch_size={self.global_batch} is not a multiple of grad_accum={self.grad_accum}")
