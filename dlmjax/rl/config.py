"""Every knob of the RL rows and losses (SLIM-RL, TraceRL, random masking, coupled) with the published defaults.

Pure Python (no JAX): the host-side row builders and the jnp objectives both read it. Each default cites its source
in the spec (`shared/spec/slimrl_tracerl.md`, section numbers) and is listed in docs/rl_rows_notes.md.
"""

from __future__ import annotations

import dataclasses

OBJECTIVES = ("slim", "tracerl", "random", "coupled")
LEVELS = ("sequence", "token", "block")
KL_ESTIMATORS = ("k1", "k2", "k3")
MASK_SHAPES = ("cosine", "linear")
BLOCK_ALIGNS = ("response", "absolute")
ADVANTAGES = ("dr_grpo", "z_score")
GROUP_FILTERS = ("math", "code", "none")


@dataclasses.dataclass(frozen=True)
class RLObjectiveConfig:
    """One RL objective: how rows are built from rollouts and how their loss is computed."""

    objective: str = "slim"  # slim | tracerl | random | coupled (the last three share the token-level loss)
    block_size: int = 16  # K of the training layout; must equal the rollout block size (§1.7 training.block_size)
    # A6: "response" = blocks counted from the response start (both trainers, §0.5/§7); "absolute" = blocks at
    # absolute positions 0, K, 2K, ... as the decoder sees them (the prompt remainder shares the first block).
    block_align: str = "response"
    # SLIM-RL rows (§1.3, §1.4, §7)
    num_quadrature_points: int = 3  # Gauss-Legendre nodes: rows per rollout
    mask_spread: float = 0.2  # code default (absent from the yaml, A10)
    mask_shape: str = "cosine"  # cosine | linear
    mask_increasing: bool = False  # False: block 0 most masked (the schedule is flipped)
    # TraceRL rows (§2.3, §7)
    shrink: int = 1  # merge each run of `shrink` distinct step ids (SLIM's config keeps 4, A2)
    # random-masking / coupled rows (§2.7)
    lower_p: float = 0.1
    upper_p: float = 0.9
    # loss (§1.5, §2.4, §7)
    level: str = "sequence"  # SLIM's importance_sampling_level; tracerl/random/coupled are always token level
    clip_ratio_low: float = 0.1  # sequence / block level clip [1 - low, 1 + high]
    clip_ratio_high: float = 0.1
    eps: float = 0.2  # token-level clip [1 - eps, 1 + eps]
    beta: float = 0.01  # KL weight (KL to the old policy)
    kl_estimator: str = "k3"  # k1 = d, k2 = d^2 / 2, k3 = exp(clamp(-d, +-10)) - 1 + d
    # advantages and group filter (§1.6, §2.5, §7); "" = the objective's default (slim: dr_grpo, else z_score)
    advantage: str = ""
    group_filter: str = "math"  # math: keep low <= mean reward <= high; code: drop all-zero-advantage groups
    filter_low: float = 0.2
    filter_high: float = 0.8
    # LM head: > 0 = masked-only head over chunks of this many rows (train.objectives.masked_head_ce); 0 = dense
    head_rows: int = 512

    def __post_init__(self):
        def check(ok, why):
            if not ok:
                raise ValueError(f"RLObjectiveConfig: {why}")

        check(self.objective in OBJECTIVES, f"objective={self.objective!r} is not one of {OBJECTIVES}")
        check(self.level in LEVELS, f"level={self.level!r} is not one of {LEVELS}")
        check(self.kl_estimator in KL_ESTIMATORS, f"kl_estimator={self.kl_estimator!r} not in {KL_ESTIMATORS}")
        check(self.mask_shape in MASK_SHAPES, f"mask_shape={self.mask_shape!r} is not one of {MASK_SHAPES}")
        check(self.block_align in BLOCK_ALIGNS, f"block_align={self.block_align!r} is not one of {BLOCK_ALIGNS}")
        check(self.advantage in ADVANTAGES + ("",), f"advantage={self.advantage!r} is not one of {ADVANTAGES}")
        check(self.group_filter in GROUP_FILTERS, f"group_filter={self.group_filter!r} not in {GROUP_FILTERS}")
        check(self.block_size > 0, f"block_size={self.block_size} must be > 0")
        check(self.num_quadrature_points > 0, f"num_quadrature_points={self.num_quadrature_points} must be > 0")
        check(self.shrink > 0, f"shrink={self.shrink} must be > 0")
        check(0.0 <= self.lower_p <= self.upper_p <= 1.0, f"need 0 <= lower_p <= upper_p <= 1, got "
              f"{self.lower_p}, {self.upper_p}")
        check(self.mask_spread >= 0.0, f"mask_spread={self.mask_spread} must be >= 0")
        check(0.0 <= self.clip_ratio_low < 1.0 and self.clip_ratio_high >= 0.0,
              f"clip ratios ({self.clip_ratio_low}, {self.clip_ratio_high}) out of range")
        check(0.0 <= self.eps < 1.0, f"eps={self.eps} must be in [0, 1)")
        check(self.beta >= 0.0, f"beta={self.beta} must be >= 0")
        check(self.head_rows >= 0, f"head_rows={self.head_rows} must be >= 0")

    @property
    def loss_level(self) -> str:
        """The importance-sampling level actually used: `level` for slim, token for the TraceRL family."""
        return self.level if self.objective == "slim" else "token"

    @property
    def advantage_method(self) -> str:
        """dr_grpo for SLIM-RL (§1.6), z_score for TraceRL / random / coupled (§2.5) unless set."""
        return self.advantage or ("dr_grpo" if self.objective == "slim" else "z_score")

    def replace(self, **kw) -> "RLObjectiveConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class ValueConfig:
    """TraceRL's optional diffusion value model (spec §2.6; dLLM-RL configs/rl_sdar_with_value.yaml, train/
    train_sdar_value.py). Its presence in the run (RLRunConfig.value) turns it on; TraceRL rows only."""

    lr: float = 5e-6  # optimizer.params.value_learning_rate (the policy's schedule / betas / eps / clip otherwise)
    clip: float = 0.2  # value clip: V_old + clip(V - V_old, +-clip) (the reference reuses training.eps = 0.2)
    gamma: float = 1.0  # training.gam
    lam: float = 1.0  # training.lam
    train_every: int = 1  # experiment.train_value_every: update the value model on outer steps (1-based) % n == 0

    def __post_init__(self):
        def check(ok, why):
            if not ok:
                raise ValueError(f"ValueConfig: {why}")

        check(self.lr > 0, f"value_lr={self.lr} must be > 0")
        check(self.clip > 0, f"value_clip={self.clip} must be > 0")
        check(0.0 <= self.gamma <= 1.0, f"gamma={self.gamma} must be in [0, 1]")
        check(0.0 <= self.lam <= 1.0, f"lam={self.lam} must be in [0, 1]")
        check(self.train_every >= 1, f"train_value_every={self.train_every} must be >= 1")
