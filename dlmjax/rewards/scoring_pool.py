"""A pool of reward-scoring worker processes with a per-sample time limit (the math reward's batch scorer).

Workers are fresh interpreters (``subprocess``, not fork: nothing of the trainer's jax state is inherited) that load
this file standalone (no package ``__init__``, hence no jax), then import the scorer's module; they are reused across
calls. A sample whose scorer raises, crashes its worker or runs past the time limit costs only its own value (0.0)
and is counted; the worker is killed and replaced and the batch goes on. Results come back in input order.
A scorer module may define ``warm_up()``: the worker calls it once before it reports ready, so cold imports
(sympy, math-verify) are not charged to the first sample's time limit.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

__all__ = ["PoolResult", "ScoringPool"]

_THIS_MODULE = __name__
_THIS_FILE = os.path.abspath(__file__)
DEFAULT_SCORER = "dlmjax.rewards.math:math_reward"


# Runs in the worker: load this file as a standalone module (no package __init__, hence no jax), then serve.
_WORKER_BOOT = (
    "import importlib.util, json, sys\n"
    "sys.path[:] = json.loads(sys.argv[1])\n"
    "spec = importlib.util.spec_from_file_location('_dlmjax_scoring_pool_worker', sys.argv[2])\n"
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
    warm = getattr(sys.modules.get(getattr(fn, "__module__", ""), None), "warm_up", None)
    if callable(warm):   # pay the import/warm-up before "ready", not in a sample's time
        warm()
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

    ``scorer`` names a module-level function as ``"module:function"`` (default: rewards/math.py's ``math_reward``);
    each sample is ``scorer(*args, **kwargs)`` and must return a float. Workers are separate interpreters started with
    ``subprocess`` (not fork, so nothing of the trainer's jax state is inherited), given the parent's ``sys.path``,
    and load only this file before the scorer's module. They live until :meth:`close` (or the end of a ``with``
    block, or interpreter exit), so start-up is paid once.

    Failure handling, per sample: the scorer raising -> 0.0, counted, worker kept; the worker dying -> 0.0, counted,
    worker replaced; no answer within ``timeout_s`` of being handed out -> worker SIGKILLed and replaced, 0.0, counted.
    Other samples are unaffected. A worker that dies before it is ready is retried; `start_retries` consecutive start
    failures raise RuntimeError (a broken environment, not a bad sample).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, scorer: str = DEFAULT_SCORER,
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
