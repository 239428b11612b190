"""The scorer registry shared by the eval job and RL: name -> scorer(completion, answer) -> bool.

addition  the demo task's worked answer (dlmjax.data.addition.score)
exact     whitespace-stripped string equality
math      math-verify equivalence of the whole completion and the answer (the eval job's historical scorer)
boxed     the RL math reward: the last \\boxed{...} of the completion, math-verify equivalence (rewards/math.py)
Code rewards run programs and so need a sandbox pool: see dlmjax.rewards.code (score_code).
"""

from __future__ import annotations

from typing import Callable

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
