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

Scoring a rollout batch goes through :class:`ScoringPool`: worker processes started fresh (``subprocess``, not fork),
each loading only this file (no jax, no package ``__init__``), reused across calls. A sample whose scorer raises,
crashes its worker or runs past ``timeout_s`` costs only its own reward (0.0) and is counted; the worker is killed and
replaced and the batch goes on. Results come back in input order.

The module imports nothing heavy at import time (sympy and math-verify load on first use), so the worker start and the
launcher's import stay cheap. It must stay importable without jax: the workers load it standalone.
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from itertools import zip_longest

__all__ = [
    "MODES", "MathDataError", "ScoringPool", "extract_boxed", "is_equal", "is_equiv", "math_reward",
    "read_math_jsonl", "score_math_batch", "close_shared_pools",
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


# ------------------------------------------------------------------------------------------ legacy: MATH normalisation

def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{7}`` -> ``\\frac{1}{7}``; an empty remainder after ``\\frac`` raises
    IndexError (the reference does too, and is_equiv then falls back to raw equality)."""
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part[0] == "{":
            out.append(part)
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        out.append("{" + a + "}" + b + tail if b == "{" else "{" + a + "}{" + b + "}" + tail)
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` (two plain integers, nothing else) -> ``\\frac{3}{4}``."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    """Drop a trailing ``\\text{ unit}``; two such groups raise ValueError like the reference's assert."""
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError("more than one '\\text{ ' group")
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``; a trailing bare ``\\sqrt`` raises IndexError (as in the reference)."""
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _strip_string(s: str) -> str:
    """The MATH dataset's answer normalisation, step for step as the reference's ``_strip_string`` (spec §3.1)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace(",", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:   # "k = 3" -> " 3" (lhs of at most 2 chars, spaces included)
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(pred: str | None, gold: str | None) -> bool:
    """The reference's first test: normalise both, equal as floats if both parse, else as strings.

    A normalisation error (malformed ``\\sqrt``/``\\frac``, two unit groups) falls back to raw string equality.
    """
    if pred is None or gold is None:
        return pred is None and gold is None
    try:
        a, b = _strip_string(pred), _strip_string(gold)
    except (IndexError, ValueError):
        return pred == gold
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# --------------------------------------------------------------------------- legacy: repetitiveness guard and sympy

def _lcp_sum(s: str) -> int:
    """Sum of the LCP array of `s` (prefix-doubling suffix array + Kasai), the quantity the reference's
    ``repeatness`` thresholds. Doubling runs until every rank is distinct (the reference stops at a fixed length,
    which can leave ties for strings like 'a'*129; the sum differs only in such degenerate cases)."""
    n = len(s)
    if n <= 1:
        return 0
    order = {c: i for i, c in enumerate(sorted(set(s)))}
    rank = [order[c] for c in s]
    k = 1
    while True:
        keys = list(zip_longest(rank, rank[k:], fillvalue=-1))
        uniq = {key: i for i, key in enumerate(sorted(set(keys)))}
        rank = [uniq[key] for key in keys]
        if len(uniq) == n or k >= n:
            break
        k <<= 1
    sa = [0] * n
    for i, r in enumerate(rank):
        sa[r] = i
    total, h = 0, 0
    for i in range(n):
        if rank[i] == n - 1:
            h = 0
            continue
        j = sa[rank[i] + 1]
        while i + h < n and j + h < n and s[i + h] == s[j + h]:
            h += 1
        total += h
        if h:
            h -= 1
    return total


def is_repetitive(s: str) -> bool:
    """The reference's ``repeatness``: mean LCP over suffix pairs, 2·ΣLCP / (n(n+1)) > 0.2 (degenerate output)."""
    n = len(s)
    return n > 1 and _lcp_sum(s) * 2 / (n * (n + 1)) > 0.2


_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
)


def normalize_final_answer(ans: str) -> str:
    """Minerva's answer normalisation (Lewkowycz et al. 2022, p. 18), as the reference uses it for its sympy retry."""
    for before, after in _MINERVA_SUBSTITUTIONS:
        ans = ans.replace(before, after)
    for expr in _MINERVA_REMOVED:
        ans = ans.replace(expr, "")
    ans = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", ans)
    ans = re.sub(r"(\\text\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", ans)
    ans = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", ans)
    ans = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", ans)
    ans = ans.replace("$", "")
    if ans.replace(",", "").isdigit():
        ans = ans.replace(",", "")
    return ans


def _latex_eval(latex: str):
    """(sympy object, its evalf()) of a LaTeX string.

    The reference calls ``sympy.parsing.latex.parse_latex``, whose ANTLR grammar needs antlr4-python3-runtime 4.11;
    the pinned math-verify stack (latex2sympy2_extended 1.11) needs 4.13, and the two cannot be installed together
    (with 4.13, ``parse_latex`` raises ImportError on every call, which would silently turn the legacy sympy step
    into a string comparison). So the legacy mode parses with ``latex2sympy2_extended.latex2sympy`` (same ANTLR
    approach, maintained grammar, default normalisation), the parser math-verify itself uses."""
    from latex2sympy2_extended import latex2sympy
    sym = latex2sympy(latex)
    return sym, sym.evalf()


def _sympy_equal(a: str, b: str) -> bool:
    """The reference's ``_is_latex_equal``: equal sympy objects or equal numeric values; on any failure or mismatch,
    retry on Minerva-normalised strings; if that retry fails to parse, compare the normalised strings."""
    try:
        sa, va = _latex_eval(a)
        sb, vb = _latex_eval(b)
        if sa == sb or va == vb:
            return True
    except Exception:  # noqa: BLE001 - parse_latex raises many types; any failure means "try the retry"
        pass
    na, nb = normalize_final_answer(a), normalize_final_answer(b)
    try:
        sa, va = _latex_eval(na)
        sb, vb = _latex_eval(nb)
        return bool(sa == sb or va == vb)
    except Exception:  # noqa: BLE001
        return na == nb


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


# ---------------------------------------------------------------------------------------------------- worker pool

_THIS_MODULE = __name__
_THIS_FILE = os.path.abspath(__file__)
_DEFAULT_SCORER = f"{_THIS_MODULE}:math_reward"

# Runs in the worker: load this file as a standalone module (no package __init__, hence no jax), then serve.
_WORKER_BOOT = (
    "import importlib.util, json, sys\n"
    "sys.path[:] = json.loads(sys.argv[1])\n"
    "spec = importlib.util.spec_from_file_location('_dlmjax_math_reward_worker', sys.argv[2])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main(int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], int(sys.argv[7]))\n"
)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: ask the kernel to SIGKILL this worker when its parent dies, so a crashed trainer leaves no orphan (even
    one stuck mid-sample, which would never read the pipe's EOF). The kernel ties this to the parent *thread* that
    started the worker: a pool made in a thread that then exits loses its idle workers, which map() replaces."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:      # the parent died before prctl took effect
        os._exit(0)


def _resolve_scorer(spec: str, this_module_name: str, own_globals: dict):
    """``"module:function"`` -> the callable; this module's own name resolves to the standalone copy in the worker."""
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise ValueError(f"scorer {spec!r} must look like 'module:function'")
    if mod_name == this_module_name:
        return own_globals[fn_name]
    return getattr(importlib.import_module(mod_name), fn_name)


def _worker_main(rfd: int, wfd: int, scorer: str, this_module_name: str, parent_pid: int) -> None:
    """Worker loop: after loading the scorer (and warming sympy/math-verify) send ("ready", pid); then for each
    ("call", idx, args, kwargs) reply ("ok", idx, value) or ("err", idx, message); exit on None or a closed pipe.
    Runs the scorer in the main thread so the signal-based 1 s comparison limit applies."""
    from multiprocessing.connection import Connection
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle; it then closes the pool
    _die_with_parent(parent_pid)
    rx, tx = Connection(rfd, writable=False), Connection(wfd, readable=False)
    fn = _resolve_scorer(scorer, this_module_name, globals())
    if scorer.startswith(this_module_name + ":"):   # pay the import/warm-up before "ready", not in a sample's time
        _math_verify()
        _warm_legacy()
    tx.send(("ready", os.getpid()))
    while True:
        try:
            msg = rx.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        _, idx, args, kwargs = msg
        try:
            tx.send(("ok", idx, float(fn(*args, **kwargs))))
        except Exception as e:  # noqa: BLE001 - a raising scorer costs its sample only; the parent counts it
            tx.send(("err", idx, f"{type(e).__name__}: {e}"[:500]))


@dataclass
class _Worker:
    proc: subprocess.Popen
    rx: object             # Connection: worker -> parent
    tx: object             # Connection: parent -> worker
    started: float
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


@dataclass
class PoolResult:
    """What :meth:`ScoringPool.map` returns: values in input order (0.0 for failures) and the failures as
    (index, reason) pairs, e.g. (7, "timed out after 5.0 s")."""
    values: list[float]
    failures: list[tuple[int, str]] = field(default_factory=list)


def _kill_and_reap(procs) -> None:
    """SIGKILL and wait for each still-running process (used by close() and by the finaliser)."""
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class ScoringPool:
    """A pool of reward-scoring worker processes with a per-sample time limit.

    ``scorer`` names a module-level function as ``"module:function"`` (default: this module's :func:`math_reward`);
    each sample is ``scorer(*args, **kwargs)`` and must return a float. Workers are separate interpreters started with
    ``subprocess`` (not fork, so nothing of the trainer's jax state is inherited), given the parent's ``sys.path``,
    and load only this file before the scorer's module. They live until :meth:`close` (or the end of a ``with``
    block, or interpreter exit), so start-up is paid once.

    Failure handling, per sample: the scorer raising -> 0.0, counted, worker kept; the worker dying -> 0.0, counted,
    worker replaced; no answer within ``timeout_s`` of being handed out -> worker SIGKILLed and replaced, 0.0, counted.
    Other samples are unaffected. A worker that dies before it is ready is retried; `start_retries` consecutive start
    failures raise RuntimeError (a broken environment, not a bad sample).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, scorer: str = _DEFAULT_SCORER,
                 start_timeout_s: float = 120.0, start_retries: int = 3):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.n_workers, self.timeout_s, self.scorer = workers, float(timeout_s), scorer
        self.start_timeout_s, self.start_retries = start_timeout_s, start_retries
        self._workers: list[_Worker] = []
        self._procs: list[subprocess.Popen] = []      # every process ever started (for the finaliser and pids())
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_and_reap, self._procs)

    # -- process management
    def _spawn(self) -> _Worker:
        from multiprocessing.connection import Connection
        c_r, p_w = os.pipe()     # parent -> child
        p_r, c_w = os.pipe()     # child -> parent
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, json.dumps(sys.path), _THIS_FILE, str(c_r), str(c_w),
                 self.scorer, _THIS_MODULE, str(os.getpid())],
                pass_fds=(c_r, c_w), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            os.close(c_r)
            os.close(c_w)
        self._procs.append(proc)
        return _Worker(proc, Connection(p_r, writable=False), Connection(p_w, readable=False), time.monotonic())

    def _retire(self, w: _Worker) -> None:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        for c in (w.rx, w.tx):
            c.close()
        self._procs.remove(w.proc)

    def start(self) -> ScoringPool:
        """Launch any missing workers without waiting for them (their ~0.4 s start-up then overlaps with whatever
        the caller does next, e.g. the first rollouts); map() waits for readiness. Returns the pool."""
        if self._closed:
            raise RuntimeError("this ScoringPool is closed")
        with self._lock:
            while len(self._workers) < self.n_workers:
                self._workers.append(self._spawn())
        return self

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return [w.proc.pid for w in self._workers]

    # -- scoring
    def map(self, calls, timeout_s: float | None = None) -> PoolResult:
        """Score ``calls``, a sequence of (args, kwargs) pairs, in parallel; values come back in input order."""
        if self._closed:
            raise RuntimeError("this ScoringPool is closed")
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        from multiprocessing.connection import wait as mp_wait
        calls = list(calls)
        values = [0.0] * len(calls)
        failures: list[tuple[int, str]] = []
        queue = collections.deque(range(len(calls)))
        with self._lock:
            try:
                while len(self._workers) < self.n_workers:
                    self._workers.append(self._spawn())
                start_failures = 0
                while queue or any(w.task is not None for w in self._workers):
                    for w in list(self._workers):
                        if w.ready and w.task is None and queue:
                            idx = queue.popleft()
                            args, kwargs = calls[idx]
                            try:
                                w.tx.send(("call", idx, tuple(args), dict(kwargs)))
                            except (BrokenPipeError, OSError):
                                queue.appendleft(idx)     # the worker died while idle: not the sample's fault
                                self._replace(w)
                                continue
                            w.task, w.deadline = idx, time.monotonic() + limit
                    now = time.monotonic()
                    deadlines = [w.deadline if w.task is not None else w.started + self.start_timeout_s
                                 for w in self._workers if w.task is not None or not w.ready]
                    wait_s = max(0.0, min(deadlines) - now) if deadlines else None
                    for rx in mp_wait([w.rx for w in self._workers], timeout=wait_s):
                        w = next(w for w in self._workers if w.rx is rx)
                        try:
                            msg = rx.recv()
                        except (EOFError, OSError):
                            msg = None
                        if msg is None:                    # the worker died
                            code = w.proc.wait()
                            if w.task is not None:
                                failures.append((w.task, f"worker exited with code {code}"))
                            elif not w.ready:
                                start_failures += 1
                                if start_failures >= self.start_retries:
                                    raise RuntimeError(f"reward workers fail to start (scorer {self.scorer!r}, "
                                                       f"last exit code {code}); see the worker's stderr above")
                            self._replace(w)
                        elif msg[0] == "ready":
                            w.ready, start_failures = True, 0
                        else:
                            kind, idx, payload = msg
                            if kind == "ok":
                                values[idx] = payload
                            else:
                                failures.append((idx, payload))
                            w.task = None
                    now = time.monotonic()
                    for w in list(self._workers):
                        if w.task is not None and now >= w.deadline:
                            failures.append((w.task, f"timed out after {limit:g} s"))
                            self._replace(w)
                        elif not w.ready and w.task is None and now >= w.started + self.start_timeout_s:
                            raise RuntimeError(f"a reward worker did not start within {self.start_timeout_s:g} s")
            except BaseException:
                # an error (or Ctrl-C) mid-batch: in-flight answers would otherwise reach the next call
                self._reset()
                raise
        failures.sort()
        return PoolResult(values, failures)

    def _reset(self) -> None:
        """Kill and reap every worker (the next map() starts fresh ones)."""
        for w in self._workers:
            self._retire(w)
        self._workers.clear()

    def _replace(self, w: _Worker) -> None:
        i = self._workers.index(w)
        self._retire(w)
        self._workers[i] = self._spawn()

    # -- shutdown
    def close(self) -> None:
        """Stop every worker (ask, then SIGKILL after 2 s) and reap it; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for w in self._workers:
                try:
                    w.tx.send(None)
                except (BrokenPipeError, OSError):
                    pass
            deadline = time.monotonic() + 2.0
            for w in self._workers:
                try:
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for w in self._workers:
                self._retire(w)
            self._workers.clear()
        self._finalizer.detach()

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            (f"\\{{1, {k}\\}}", f"\\{{{k},1\\}}", f"\\{{1\\}}"),
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
