"""The scorer registry shared by the eval job and RL: name -> scorer(completion, answer) -> bool.

addition  the demo task's worked answer (dlmjax.data.addition.score)
exact     whitespace-stripped string equality
math      math-verify equivalence of the whole completion and the answer (the eval job's historical scorer)
boxed     the RL math reward: the last \\boxed{...} of the completion, math-verify equivalence (rewards/math.py)
Batch rewards for RL (`make_reward`): the same names scored over a batch, plus `code` (unit tests run in the
bubblewrap sandbox pool, reward = passed tests or their fraction). A sample that raises or hangs costs its own
reward only and is counted.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

SCORERS = ("addition", "exact", "math", "boxed")


def _exact(text: str, answer: str) -> bool:
    return text.strip() == answer.strip()


def _math(text: str, answer: str) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(answer), parse(text)))


def _boxed(text: str, answer: str) -> bool:
    from dlmjax.rewards.math import math_reward

    return math_reward(text, answer) > 0


def get_scorer(name: str) -> Callable[[str, str], bool]:
    """The scorer called `name` (ValueError naming the known ones otherwise)."""
    if name == "addition":
        from dlmjax.data.addition import score

        return score
    table = {"exact": _exact, "math": _math, "boxed": _boxed}
    if name not in table:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return table[name]


REWARDS = ("addition", "exact", "math", "boxed", "code")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How RL scores a batch of completions."""

    kind: str = "boxed"  # one of REWARDS
    math_mode: str = "math_verify"  # boxed: math_verify | legacy (the reference's comparison)
    truncation_penalty: bool = True  # boxed: 0 when the response reaches max_tokens - 5 (spec §1.6; not for code)
    code_reward: str = "count"  # code: count (SLIM-RL: passed tests) | fraction
    workers: int = 2  # scoring processes (boxed) / sandbox workers (code)
    timeout_s: float = 10.0  # boxed: per-sample scoring limit

    def __post_init__(self):
        if self.kind not in REWARDS:
            raise ValueError(f"reward={self.kind!r} is not one of {REWARDS}")
        if self.math_mode not in ("math_verify", "legacy"):
            raise ValueError(f"math_mode={self.math_mode!r} is not math_verify | legacy")
        if self.code_reward not in ("count", "fraction"):
            raise ValueError(f"code_reward={self.code_reward!r} is not count | fraction")
        if self.workers < 0 or (self.kind == "code" and self.workers < 1):
            raise ValueError(f"reward_workers={self.workers} must be >= 0 (>= 1 for code)")


def make_reward(rc: RewardConfig, max_tokens: int):
    """(score, close): score(completions: list[str], samples: list[dict], n_tokens: list[int]) -> (rewards [B] f32,
    n_failed). samples carry "answer" (text scorers) or "task" (a code.CodeTask). close() stops the workers."""
    if rc.kind == "boxed":
        from dlmjax.rewards import math as M

        pool = M.ScoringPool(rc.workers, timeout_s=rc.timeout_s) if rc.workers else None

        def score(completions, samples, n_tokens):
            vals, failed = M.score_math_batch(
                completions, [s["answer"] for s in samples], mode=rc.math_mode,
                n_tokens=n_tokens if rc.truncation_penalty else None,
                max_tokens=max_tokens if rc.truncation_penalty else None, workers=0, pool=pool,
                timeout_s=rc.timeout_s)
            return np.asarray(vals, np.float32), failed

        return score, (pool.close if pool is not None else (lambda: None))
    if rc.kind == "code":
        from dlmjax.rewards import code as C
        from dlmjax.rewards.sandbox import SandboxPool

        pool = SandboxPool(rc.workers)

        def score(completions, samples, n_tokens):
            vals = C.score_code(completions, [s["task"] for s in samples], pool, reward=rc.code_reward)
            return np.asarray(vals, np.float32), 0

        return score, pool.close
    fn = get_scorer(rc.kind)

    def score(completions, samples, n_tokens):
        out, failed = [], 0
        for c, s in zip(completions, samples):
            try:
                out.append(float(bool(fn(c, s["answer"]))))
            except Exception:  # noqa: BLE001 - a scorer failure costs this sample's reward only, and is counted
                out.append(0.0)
                failed += 1
        return np.asarray(out, np.float32), failed

    return score, (lambda: None)
