"""The scorer registry the eval job and RL share: every listed name resolves, unknown names are named in the error."""

import pytest

from dlmjax.rewards import SCORERS, get_scorer


def test_every_scorer_resolves_and_judges():
    cases = {"exact": (" 42 ", "42", "41"), "math": ("The answer is $\\frac{1}{2}$", "0.5", "The answer is 3"),
             "boxed": ("so \\boxed{\\frac12}", "0.5", "so 0.5 without a box")}
    for name in SCORERS:
        fn = get_scorer(name)
        if name == "addition":
            from dlmjax.data import addition

            prob = addition.make_splits(4, 1, 2, seed=0)[0][0]
            assert fn(prob["answer"], prob["answer"]) and not fn("0000=0000", prob["answer"])
            continue
        good, answer, bad = cases[name]
        assert fn(good, answer) is True and fn(bad, answer) is False, name


def test_unknown_scorer_is_named():
    with pytest.raises(ValueError, match="'nope'.*addition, exact, math, boxed"):
        get_scorer("nope")
