"""Math reward for RL and evaluation (spec slimrl_tracerl.md §3.1, §1.6; issue 12 §4).

A response earns 1.0 when the content of its LAST brace-matched ``\\boxed{...}`` is equivalent to the gold answer,
else 0.0 (also 0.0 when there is no such box). Two equivalence modes:

* ``math_verify`` (default): HuggingFace ``math-verify`` (pinned 0.9.0). Both sides are wrapped as ``\\boxed{...}`` so
  its LaTeX extractor sees them the way it expects, and its own signal-based timeouts are switched off
  (``parsing_timeout=None``, ``timeout_seconds=None``) because ``signal.alarm`` only works in the main thread; the time
  limit is ours instead (:func:`_call_with_timeout`, 1 s like the reference's ``asyncio.wait_for``).
* ``legacy``: the reference's ``is_equal(..., math_mode="legacy")``: the MATH ``_strip_string`` normalisation with float
  or string equality, else (unless either string is long and repetitive) a sympy comparison of the parsed LaTeX with
  the Minerva ``normalize_final_answer`` retry, under a 1 s limit; a timeout means "not equal". (The LaTeX parser is
  latex2sympy2_extended's rather than sympy's own: see :func:`_latex_eval`.)

During training the reward is also 0 when the response used ``n_tokens >= max_tokens - 5`` tokens (§1.6); evaluation
leaves ``n_tokens``/``max_tokens`` unset (§1.8: the eval scorer applies no truncation rule).

Scoring a rollout batch goes through rewards/scoring_pool.py's :class:`ScoringPool` (worker processes; a sample
that raises, crashes its worker or hangs costs only its own reward, 0.0, and is counted). The legacy comparison's
normalisation and sympy test are in rewards/math_legacy.py.

The module imports nothing heavy at import time (sympy and math-verify load on first use), so the worker start and the
launcher's import stay cheap; the workers import it without jax.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
import time

from dlmjax.rewards.math_legacy import _latex_eval, _sympy_equal, is_equiv, is_repetitive
from dlmjax.rewards.scoring_pool import PoolResult, ScoringPool

__all__ = [
    "MODES", "MathDataError", "ScoringPool", "extract_boxed", "is_equal", "is_equiv", "math_reward",
    "read_math_jsonl", "score_math_batch", "close_shared_pools", "warm_up", "PoolResult",
]

MODES = ("math_verify", "legacy")
COMPARE_TIMEOUT_S = 1.0      # the reference's asyncio.wait_for(timeout=1.0) around the symbolic comparison
TRUNCATION_MARGIN = 5        # §1.6: reward 0 when n_tokens >= max_tokens - 5
REPETITIVE_MIN_LEN = 128     # the reference's repetitiveness guard applies to strings longer than this


# --------------------------------------------------------------------------------------------------------- extraction

_BOX = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{`` in `text`, up to its brace-matched ``}``; None when absent or unbalanced.

    Same rule as the reference's ``extract_final_boxed_answer``: only the literal ``\\boxed{`` opener counts (no
    ``\\boxed 5``, no ``\\fbox``), braces are counted character by character (so ``\\{``/``\\}`` count too), and only
    the LAST opener is tried: when it is unbalanced the answer is None even if an earlier box was closed.
    An empty box gives "" (the caller scores it 0).
    """
    start = text.rfind(_BOX)
    if start < 0:
        return None
    depth = 1
    i = start + len(_BOX)
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(_BOX):i]
        i += 1
    return None


# ------------------------------------------------------------------------------------------------------- time limit

class _CompareTimeout(BaseException):
    """Raised into a comparison that ran out of time. A BaseException so the broad ``except Exception`` blocks inside
    sympy / math-verify cannot swallow it and carry on."""


def _call_with_timeout(fn, args: tuple, seconds: float):
    """(finished, value) of ``fn(*args)`` limited to `seconds` of wall time; never blocks the caller longer.

    In the main thread (the pool's workers, a plain script) an ``ITIMER_REAL`` alarm interrupts the computation
    itself. Elsewhere (a caller's worker thread, or an alarm already armed by someone else) the call runs in a daemon
    thread that is abandoned on timeout: the caller returns on time but the thread may keep a core busy until it ends,
    which is why batches should go through :class:`ScoringPool` (whose workers are processes it can kill).
    Exceptions raised by `fn` propagate.
    """
    main = threading.current_thread() is threading.main_thread()
    if main and hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        def _alarm(signum, frame):
            raise _CompareTimeout()

        old = signal.signal(signal.SIGALRM, _alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return True, fn(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _CompareTimeout:
            return False, None
        finally:
            signal.signal(signal.SIGALRM, old)
    box: dict = {}

    def _run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller below
            box["error"] = e

    t = threading.Thread(target=_run, name="math-reward-compare", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["value"]


# ------------------------------------------------------------------------------------------------------ math-verify

class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; we turned them off on purpose and time-limit the
    call ourselves, so that one message is dropped (all others pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_MV = None
_LEGACY_READY = False


def _math_verify():
    """(parse, verify) from math-verify, imported and warmed on first use (outside any time limit: the cold import
    and the first parse's grammar/regex set-up take about a second, which would otherwise make the first comparison
    of a fresh process time out), with the timeout warning filtered."""
    global _MV
    if _MV is None:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        from math_verify import parse, verify
        verify(parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None), parse("$0.5$", parsing_timeout=None),
               timeout_seconds=None)
        _MV = (parse, verify)
    return _MV


def _warm_legacy() -> None:
    """Import and exercise the legacy LaTeX parser once, untimed, for the same reason as in :func:`_math_verify`."""
    global _LEGACY_READY
    if not _LEGACY_READY:
        _latex_eval("\\frac{1}{2}+x")
        _LEGACY_READY = True


def warm_up() -> None:
    """Import and warm math-verify and the legacy parser (scoring_pool's workers call it before they report ready)."""
    _math_verify()
    _warm_legacy()


def _wrap_for_math_verify(ans: str) -> str:
    """math-verify's LaTeX extractor looks for ``\\boxed{}`` or ``$..$``; a bare answer string is boxed, one that
    already carries its own ``\\boxed`` or ``$`` delimiters is passed as is."""
    s = ans.strip()
    if "\\boxed" in s or "$" in s.replace("\\$", ""):
        return s
    return "\\boxed{" + s + "}"


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """math-verify's parse of a gold answer, cached: the G rollouts of a prompt share it. A tuple, so the cached
    value cannot be modified by a caller."""
    parse, _ = _math_verify()
    return tuple(parse(_wrap_for_math_verify(gold), parsing_timeout=None))


def _math_verify_equal(pred: str, gold: str) -> bool:
    parse, verify = _math_verify()
    g = list(_parse_gold(gold))
    p = parse(_wrap_for_math_verify(pred), parsing_timeout=None)
    return bool(verify(g, p, timeout_seconds=None))


# ------------------------------------------------------------------------------------------------------ the reward

def is_equal(pred: str, gold: str, mode: str = "math_verify", timeout_s: float = COMPARE_TIMEOUT_S) -> bool:
    """Whether the extracted answer `pred` matches `gold` under `mode` (see the module docstring).

    ``math_verify``: ``verify(parse(gold), parse(pred))`` (gold first: math-verify is asymmetric), time-limited.
    ``legacy``: :func:`is_equiv`, else False for a >128-char repetitive string, else the time-limited sympy test.
    A comparison that runs past `timeout_s` is "not equal" (the reference's behaviour), not an error.
    """
    if mode == "math_verify":
        _math_verify()
        done, value = _call_with_timeout(_math_verify_equal, (pred, gold), timeout_s)
        return bool(done and value)
    if mode == "legacy":
        if is_equiv(pred, gold):
            return True
        if any(len(x) > REPETITIVE_MIN_LEN and is_repetitive(x) for x in (pred, gold)):
            return False
        _warm_legacy()
        done, value = _call_with_timeout(_sympy_equal, (pred, gold), timeout_s)
        return bool(done and value)
    raise ValueError(f"unknown math reward mode {mode!r}; expected one of {MODES}")


def math_reward(response: str, answer: str, *, mode: str = "math_verify", n_tokens: int | None = None,
                max_tokens: int | None = None, timeout_s: float = COMPARE_TIMEOUT_S) -> float:
    """1.0 if the last boxed answer of `response` equals `answer` under `mode`, else 0.0.

    0.0 when there is no brace-matched box or it is empty, and, when both `n_tokens` (the response's generated token
    count) and `max_tokens` (the rollout budget) are given, when ``n_tokens >= max_tokens - 5`` (training only, §1.6:
    a truncated response cannot be trusted to be finished).
    """
    if mode not in MODES:
        raise ValueError(f"unknown math reward mode {mode!r}; expected one of {MODES}")
    if n_tokens is not None and max_tokens is not None and n_tokens >= max_tokens - TRUNCATION_MARGIN:
        return 0.0
    pred = extract_boxed(response)
    if pred is None or not pred.strip():
        return 0.0
    return 1.0 if is_equal(pred, str(answer), mode, timeout_s) else 0.0


_SHARED: dict[int, ScoringPool] = {}
_SHARED_LOCK = threading.Lock()


def _shared_pool(workers: int) -> ScoringPool:
    with _SHARED_LOCK:
        pool = _SHARED.get(workers)
        if pool is None or pool._closed:
            pool = _SHARED[workers] = ScoringPool(workers)
        return pool


def close_shared_pools() -> None:
    """Close the pools :func:`score_math_batch` keeps between calls (also done at interpreter exit)."""
    with _SHARED_LOCK:
        for pool in _SHARED.values():
            pool.close()
        _SHARED.clear()


def score_math_batch(responses, answers, *, mode: str = "math_verify", n_tokens=None, max_tokens: int | None = None,
                     workers: int = 2, timeout_s: float = 10.0,
                     pool: ScoringPool | None = None) -> tuple[list[float], int]:
    """(rewards in input order, n_failed) for parallel lists of responses and gold answers.

    `n_tokens` (a list, one count per response) and `max_tokens` switch on the training truncation rule. Scoring
    runs in `pool`, or in a pool of `workers` processes kept for later calls (closed at exit or by
    :func:`close_shared_pools`); ``workers=0`` scores in this process (no protection against a hang; a raising
    sample is still counted). A failed sample (raised, crashed its worker, or ran past `timeout_s`) gets 0.0.
    """
    responses, answers = list(responses), list(answers)
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    if n_tokens is not None and len(n_tokens) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(n_tokens)} token counts")
    if mode not in MODES:
        raise ValueError(f"unknown math reward mode {mode!r}; expected one of {MODES}")
    calls = [((r, a), {"mode": mode, "n_tokens": None if n_tokens is None else int(n_tokens[i]),
                       "max_tokens": max_tokens})
             for i, (r, a) in enumerate(zip(responses, answers))]
    if not calls:
        return [], 0
    if pool is None and workers == 0:
        out, failed = [], 0
        for args, kwargs in calls:
            try:
                out.append(math_reward(*args, **kwargs))
            except Exception:  # noqa: BLE001 - counted, as in the pool
                out.append(0.0)
                failed += 1
        return out, failed
    res = (pool or _shared_pool(workers)).map(calls, timeout_s=timeout_s)
    return res.values, len(res.failures)


# ------------------------------------------------------------------------------------------------------- the data

class MathDataError(ValueError):
    """A malformed math prompt file; the message starts with the path (and ``:line`` when one line is at fault)."""


_FIELDS = (("prompt", "question"), ("answer", "ground_truth_answer"))


def _check_math_record(rec) -> dict:
    """The record with canonical "prompt"/"answer" keys (aliases folded in); ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    out = dict(rec)
    for key, alias in _FIELDS:
        if key in rec and alias in rec:
            raise ValueError(f"both '{key}' and its alias '{alias}' are present; keep one")
        name = key if key in rec else alias if alias in rec else None
        if name is None:
            raise ValueError(f"missing '{key}' (or '{alias}')")
        val = out.pop(name)
        if key == "answer" and isinstance(val, int) and not isinstance(val, bool):
            val = str(val)                   # integer gold answers (GSM8K-style) are accepted as their digits
        if not isinstance(val, str):
            raise ValueError(f"'{name}' must be a string, got {type(val).__name__}")
        if not val.strip():
            raise ValueError(f"'{name}' is empty")
        out[key] = val
    return out


def read_math_jsonl(path: str) -> list[dict]:
    """Records ``{"prompt", "answer", ...other keys}`` from a JSONL file; ``question``/``ground_truth_answer`` (the
    reference's names) are accepted for them. Blank lines are skipped. Raises :class:`MathDataError` naming
    ``path:line`` for a line that is not UTF-8, not JSON, not an object, or lacks/mistypes a field, and naming the
    path when the file cannot be opened or holds no record."""
    from dlmjax import jsonl

    records = []
    for n, raw in jsonl.lines(path, "math data file", MathDataError):
        try:
            records.append(_check_math_record(jsonl.parse(raw)))
        except ValueError as e:
            raise MathDataError(f"{path}:{n}: {e}") from None
    if not records:
        raise MathDataError(f"{path}: no records (expected JSONL lines like {{\"prompt\": ..., \"answer\": ...}})")
    return records


# ------------------------------------------------------------------------------------------------------ benchmark

def _bench_samples(n: int, group: int = 8) -> tuple[list[str], list[str]]:
    """`n` MATH-like (response, answer) pairs in groups of `group` rollouts sharing a gold answer (as in RL), with
    numbers that change from group to group so math-verify's internal parse caches do not flatter the timing: a
    paragraph of reasoning, then a box holding a correct but differently written answer (even rollouts) or a wrong
    one (odd); one response in 37 has no box. Kinds: fractions, radicals, intervals, sets, polynomials, multiples of
    pi, thousands separators, negative fractions, units."""
    resp, ans = [], []
    for i in range(n):
        k = i // group + 2
        kinds = [
            (f"\\frac{{1}}{{{k}}}", f"\\dfrac{{1}}{{{k}}}", f"\\frac{{1}}{{{k + 1}}}"),
            (f"{k * 7}", f"{k * 7}.0", f"{k * 7 + 1}"),
            (f"{k}\\sqrt{{3}}", f"\\sqrt{{{3 * k * k}}}", f"{k}\\sqrt{{2}}"),
            (f"[0, {k})", f"[0,{k})", f"(0, {k}]"),
            (f"\\{{1, {k}\\}}", f"\\{{{k},1\\}}", "\\{1\\}"),
            (f"x^2+{k}x", f"{k}x+x^2", f"x^2-{k}x"),
            (f"{k}\\pi", f"\\pi \\cdot {k}", f"{k + 1}\\pi"),
            (f"{k}000", f"{k},000", f"{k}00"),
            (f"-\\frac{{{k}}}{{4}}", f"-\\dfrac{{{k}}}{{4}}", f"\\frac{{{k}}}{{4}}"),
            (f"{k}", f"{k}\\text{{ cm}}", f"x = {k + 2}"),
        ]
        gold, right, wrong = kinds[(i // group) % len(kinds)]
        body = f"Let us compute step by step: {i} and {k}. " * 8
        pred = right if i % 2 == 0 else wrong
        resp.append(body + ("no box here" if i % 37 == 0 else f"The answer is $\\boxed{{{pred}}}$."))
        ans.append(gold)
    return resp, ans


def _bench(argv: list[str]) -> None:
    """``python -m dlmjax.rewards.math --n 1000 --workers 0 1 2 --mode math_verify --group 8``: wall time of scoring `n`
    synthetic samples in this process (0) and in pools of 1 and 2 workers (start-up timed separately)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m dlmjax.rewards.math", description=_bench.__doc__)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mode", choices=MODES, default="math_verify")
    ap.add_argument("--group", type=int, default=8,
                    help="rollouts per gold answer (8 = G; 1 makes every sample distinct, defeating parse caches)")
    a = ap.parse_args(argv)
    resp, ans = _bench_samples(a.n, a.group)
    for w in a.workers:
        t0 = time.perf_counter()
        if w == 0:                                  # in this process, no pool (the baseline)
            _math_verify() if a.mode == "math_verify" else _warm_legacy()     # imports and warm-up
            t1 = time.perf_counter()
            rewards, failed = score_math_batch(resp, ans, mode=a.mode, workers=0)
            t2 = time.perf_counter()
        else:
            with ScoringPool(w) as pool:
                pool.map([((r, g), {"mode": a.mode}) for r, g in zip(resp[:4], ans[:4])])   # start + warm-up
                t1 = time.perf_counter()
                rewards, failed = score_math_batch(resp, ans, mode=a.mode, pool=pool)
                t2 = time.perf_counter()
        print(f"mode={a.mode} group={a.group} workers={w} n={a.n}: start {t1 - t0:.2f} s, score {t2 - t1:.2f} s "
              f"({a.n / (t2 - t1):.0f} samples/s), mean reward {sum(rewards) / len(rewards):.3f}, failed {failed}")


if __name__ == "__main__":
    _bench(sys.argv[1:])
