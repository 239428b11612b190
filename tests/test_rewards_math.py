"""Math reward (spec slimrl_tracerl.md §3.1, §1.6; issue 12 §4): boxed extraction, both equivalence modes, the
training truncation rule, the JSONL reader, and the scoring pool's failure isolation and process hygiene.

Expected values come from the spec's rules and from the mathematics of each pair, not from running the code.
"""

from __future__ import annotations

import os
import random
import textwrap
import threading
import time

import pytest

from dlmjax.rewards import math as M
from dlmjax.rewards import math_legacy as ML

# --------------------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                                  # nested braces
    ("\\boxed{\\left\\{1, \\{2\\}\\right\\}}", "\\left\\{1, \\{2\\}\\right\\}"),  # escaped braces count as braces
    ("first \\boxed{1}, then \\boxed{2} final", "2"),                          # the last box wins
    ("\\boxed{1} and then \\boxed{\\frac{1}{2}", None),                          # last box unbalanced: no answer
    ("no box at all: 42", None),
    ("\\boxed 5", None),                                                           # only the braced opener counts
    ("\\fbox{5}", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert M.extract_boxed(text) == expected


# ------------------------------------------------------------------------------------------------------- equivalence

# (extracted answer, gold, equal?) true for both modes: these follow from the mathematics and from the spec's
# normalisation list (dfrac->frac, units, "x =", commas, 0.5 -> 1/2).
BOTH_MODES = [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("\\tfrac{3}{4}", "3/4", True),
    ("10\\text{ cm}", "10", True),
    ("x = 3", "3", True),
    ("1,000", "1000", True),
    ("90^\\circ", "90", True),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("[0, 1)", "[0,1)", True),
    ("\\{2, 1\\}", "\\{1, 2\\}", True),
    ("2^{3}", "8", True),
    ("1 + x", "x+1", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "\\frac{1}{2}", False),
    ("0.33", "\\frac{1}{3}", False),
    ("(0, 1]", "[0, 1)", False),
    ("\\pi", "3.14", False),
    ("-2", "2", False),
]


@pytest.mark.parametrize("mode", M.MODES)
@pytest.mark.parametrize("pred,gold,equal", BOTH_MODES)
def test_is_equal_both_modes(mode, pred, gold, equal):
    assert M.is_equal(pred, gold, mode) is equal


def test_modes_differ_on_comma_stripping():
    """The spec's legacy normalisation deletes every comma, so the open interval (1,2) becomes "(12)" and matches the
    number-in-parentheses (12); math-verify keeps the interval and (correctly) says no."""
    assert M.is_equal("(12)", "(1,2)", "legacy") is True
    assert M.is_equal("(12)", "(1,2)", "math_verify") is False


def test_strip_string_steps():
    """A few of §3.1's normalisation steps one at a time."""
    assert ML._strip_string("\\left( 1 \\right)") == "(1)"
    assert ML._strip_string("50\\%") == "50"
    assert ML._strip_string(".5") == "\\frac{1}{2}"            # leading "." gets a 0, then 0.5 -> \frac{1}{2}
    assert ML._strip_string("k = 7") == "7"                   # lhs of at most two characters dropped
    assert ML._strip_string("abc = 7") == "abc=7"              # a longer lhs is kept
    assert ML._strip_string("\\$ 4") == "4"


def test_legacy_repetitive_guard():
    """201 characters of "1+1+...+1" sum to 101, so the sympy step alone says equal; the spec's guard rejects a
    >128-character repetitive string before sympy runs."""
    long_sum = "1+" * 100 + "1"
    assert len(long_sum) > 128 and M.is_repetitive(long_sum)
    assert M._sympy_equal(long_sum, "101") is True
    assert M.is_equal(long_sum, "101", "legacy") is False
    rnd = random.Random(0)
    assert not M.is_repetitive("".join(rnd.choice("0123456789+-=xyz()") for _ in range(200)))
    # "ab" * 100: every suffix shares all but its tail with the one two further on; clearly repetitive
    assert M.is_repetitive("ab" * 100)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown math reward mode"):
        M.math_reward("\\boxed{1}", "1", mode="exact")


# ------------------------------------------------------------------------------------------------------- time limits

def _spin(seconds):
    """Pure-Python busy loop (interruptible between bytecodes), returns 'done'."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done"


def test_timeout_interrupts_in_main_thread():
    t0 = time.monotonic()
    assert M._call_with_timeout(_spin, (30.0,), 0.3) == (False, None)
    assert time.monotonic() - t0 < 5.0
    assert M._call_with_timeout(_spin, (0.0,), 2.0) == (True, "done")


def test_timeout_returns_on_time_in_other_thread():
    out = {}

    def run():
        t0 = time.monotonic()
        out["r"] = M._call_with_timeout(time.sleep, (30.0,), 0.3)
        out["dt"] = time.monotonic() - t0

    th = threading.Thread(target=run)
    th.start()
    th.join(20)
    assert out["r"] == (False, None) and out["dt"] < 5.0


def test_comparison_timeout_is_not_equal(monkeypatch):
    """A symbolic step that never ends counts as "not equal" after the limit (the reference's wait_for timeout)."""
    monkeypatch.setattr(M, "_sympy_equal", lambda a, b: _spin(30.0) and True)
    t0 = time.monotonic()
    assert M.is_equal("\\frac{2}{4}", "\\frac{1}{2}", "legacy", timeout_s=0.3) is False
    assert time.monotonic() - t0 < 5.0


# --------------------------------------------------------------------------------------------------------- reward

@pytest.mark.parametrize("mode", M.MODES)
def test_math_reward_and_truncation(mode):
    good = "We get $x = \\frac{1}{2}$, so \\boxed{\\dfrac{1}{2}}."
    assert M.math_reward(good, "0.5", mode=mode) == 1.0
    assert M.math_reward("so \\boxed{3}", "0.5", mode=mode) == 0.0
    assert M.math_reward("the answer is 0.5", "0.5", mode=mode) == 0.0         # no box: 0
    assert M.math_reward("\\boxed{ }", " ", mode=mode) == 0.0                   # empty box: 0
    # §1.6: zero when n_tokens >= max_tokens - 5
    assert M.math_reward(good, "0.5", mode=mode, n_tokens=250, max_tokens=256) == 1.0
    assert M.math_reward(good, "0.5", mode=mode, n_tokens=251, max_tokens=256) == 0.0
    assert M.math_reward(good, "0.5", mode=mode, n_tokens=256, max_tokens=256) == 0.0
    assert M.math_reward(good, "0.5", mode=mode, n_tokens=256) == 1.0          # eval: no budget, no rule


def test_score_batch_in_process_counts_raises(monkeypatch):
    def flaky(response, answer, **kw):
        if response == "RAISE":
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr(M, "math_reward", flaky)
    assert M.score_math_batch(["a", "RAISE", "b"], ["1", "1", "1"], workers=0) == ([1.0, 0.0, 1.0], 1)


def test_score_batch_argument_checks():
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        M.score_math_batch(["a", "b"], ["1"], workers=0)
    with pytest.raises(ValueError, match="token counts"):
        M.score_math_batch(["a"], ["1"], n_tokens=[1, 2], workers=0)
    assert M.score_math_batch([], [], workers=0) == ([], 0)


# ------------------------------------------------------------------------------------------------------------ data

def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_read_math_jsonl_ok(tmp_path):
    p = _write(tmp_path, "ok.jsonl", (
        b'{"prompt": "1+1?", "answer": "2", "id": 7}\n'
        b'\n'
        b'{"question": "half?", "ground_truth_answer": "\\\\frac{1}{2}"}\n'
        b'{"prompt": "3*4?", "answer": 12}\n'))
    recs = M.read_math_jsonl(p)
    assert recs == [{"prompt": "1+1?", "answer": "2", "id": 7},
                    {"prompt": "half?", "answer": "\\frac{1}{2}"},
                    {"prompt": "3*4?", "answer": "12"}]


@pytest.mark.parametrize("content,line,msg", [
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', 2, "not valid JSON"),
    (b'["prompt", "answer"]\n', 1, "expected a JSON object, got list"),
    (b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n', 3, "missing 'answer'"),
    (b'{"answer": "1"}\n', 1, "missing 'prompt'"),
    (b'{"prompt": "a", "answer": ["1"]}\n', 1, "'answer' must be a string, got list"),
    (b'{"prompt": "a", "answer": true}\n', 1, "'answer' must be a string, got bool"),
    (b'{"prompt": 3, "answer": "1"}\n', 1, "'prompt' must be a string, got int"),
    (b'{"prompt": "a", "answer": "  "}\n', 1, "'answer' is empty"),
    (b'{"prompt": "a", "question": "b", "answer": "1"}\n', 1, "both 'prompt' and its alias 'question'"),
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n', 2, "not UTF-8"),
])
def test_read_math_jsonl_errors(tmp_path, content, line, msg):
    p = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(M.MathDataError) as e:
        M.read_math_jsonl(p)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"{p}:{line}: ") and msg in str(e.value)


def test_read_math_jsonl_file_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(M.MathDataError, match="cannot open") as e:
        M.read_math_jsonl(missing)
    assert str(e.value).startswith(missing + ": ")
    empty = _write(tmp_path, "empty.jsonl", b"\n\n")
    with pytest.raises(M.MathDataError, match="no records") as e:
        M.read_math_jsonl(empty)
    assert str(e.value).startswith(empty + ": ")


# ------------------------------------------------------------------------------------------------------------ pool

def _children_of_me() -> dict[int, str]:
    """{pid: state} of this process's live children (zombies included), from /proc (no psutil)."""
    me, out = os.getpid(), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == me:
            out[int(d)] = fields[0]
    return out


def _assert_gone(pids):
    """Each pid was reaped by us (waitpid knows no such child) and is not a live or zombie child of ours."""
    kids = _children_of_me()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert pid not in kids, (pid, kids.get(pid))


FAULTY_SCORER = textwrap.dedent("""
    import os, sys, time
    from dlmjax.rewards.math import math_reward

    def score(response, answer, **kw):
        if response == "JAX?":
            return float("jax" in sys.modules)
        if response == "RAISE":
            raise RuntimeError("scorer exploded")
        if response == "HANG":
            time.sleep(3600)
        if response == "CRASH":
            os._exit(3)
        return math_reward(response, answer, **kw)
""")


def test_pool_isolates_raise_hang_crash_and_cleans_up(tmp_path, monkeypatch):
    (tmp_path / "faulty_scorer_mod.py").write_text(FAULTY_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    golds = [str(i) for i in range(12)]
    responses = [f"\\boxed{{{i}}}" if i % 3 else f"\\boxed{{{i + 1}}}" for i in range(12)]   # i % 3 == 0 wrong
    responses[4], responses[7], responses[10] = "RAISE", "HANG", "CRASH"
    expected = [0.0 if i % 3 == 0 or i in (4, 7, 10) else 1.0 for i in range(12)]
    kids_before = set(_children_of_me())
    seen = set()
    with M.ScoringPool(workers=2, timeout_s=4.0, scorer="faulty_scorer_mod:score").start() as pool:
        assert len(pool.pids()) == 2                      # start() launched them without a batch
        t0 = time.monotonic()
        rewards, failed = M.score_math_batch(responses, golds, pool=pool)
        assert time.monotonic() - t0 < 60
        assert (rewards, failed) == (expected, 3)
        seen.update(pool.pids())
        # the pool keeps going: a second call on the same pool works and reuses the same workers
        before = sorted(pool.pids())
        res = pool.map([((r, g), {}) for r, g in zip(responses[:4], golds[:4])])
        assert res.values == expected[:4] and res.failures == [] and sorted(pool.pids()) == before
    # the hung and the crashed workers were killed/reaped during the call, the rest by close()
    assert len(seen) == 2
    _assert_gone(seen)
    assert set(_children_of_me()) <= kids_before        # the killed workers too: no live or zombie child left


def test_pool_failure_reasons(tmp_path, monkeypatch):
    (tmp_path / "faulty_scorer_mod.py").write_text(FAULTY_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    kids_before = set(_children_of_me())
    pool = M.ScoringPool(workers=1, timeout_s=3.0, scorer="faulty_scorer_mod:score")
    try:
        res = pool.map([(("RAISE", "1"), {}), (("\\boxed{1}", "1"), {}), (("HANG", "1"), {}), (("CRASH", "1"), {}),
                        (("\\boxed{2}", "2"), {}), (("JAX?", "1"), {})])
        pids = pool.pids()
    finally:
        pool.close()
    assert res.values == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]          # last: the worker never imported jax
    assert [i for i, _ in res.failures] == [0, 2, 3]
    assert "RuntimeError: scorer exploded" in res.failures[0][1]
    assert "timed out after 3 s" in res.failures[1][1]
    assert "exited with code 3" in res.failures[2][1]
    _assert_gone(pids)
    assert set(_children_of_me()) <= kids_before
    with pytest.raises(RuntimeError, match="closed"):
        pool.map([(("x", "1"), {})])


def test_shared_pool_math_modes_and_close():
    """The default pool (this module's math_reward in fresh workers) scores both modes in order, with the
    truncation rule, and close_shared_pools() leaves no process behind."""
    golds = ["\\frac{1}{2}", "12", "[0,1)", "3", "7"]
    responses = ["\\boxed{0.5}", "\\boxed{12\\text{ cm}}", "\\boxed{[0, 1)}", "\\boxed{4}", "no box: 7"]
    try:
        for mode in M.MODES:
            assert M.score_math_batch(responses, golds, mode=mode, workers=2) == ([1.0, 1.0, 1.0, 0.0, 0.0], 0)
        assert M.score_math_batch(responses, golds, workers=2, n_tokens=[10, 251, 250, 1, 1],
                                  max_tokens=256) == ([1.0, 0.0, 1.0, 0.0, 0.0], 0)
        pids = M._SHARED[2].pids()
        assert len(pids) == 2
    finally:
        M.close_shared_pools()
    _assert_gone(pids)


def test_pool_gives_up_when_workers_cannot_start():
    """A scorer that cannot even be imported is a broken setup, not a bad sample: a clear error, no process left."""
    kids_before = set(_children_of_me())
    with M.ScoringPool(workers=1, scorer="no_such_module_for_dlmjax_tests:score", start_retries=2) as pool:
        with pytest.raises(RuntimeError, match="fail to start"):
            pool.map([(("\\boxed{1}", "1"), {})])
    assert set(_children_of_me()) <= kids_before
