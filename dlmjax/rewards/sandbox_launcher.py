"""The host-process side of the sandbox: exclusive uid claims (`claim_uids`), /proc scans by uid, and the launcher, a
small single-threaded helper process that starts each sandboxed program for the trainer.

uid claims: each uid a pool (or standalone Sandbox) uses is claimed with an exclusive flock on
`<lock dir>/uid-<n>` (LOCK_DIRS: /run/dlmjax-sandbox, created 0700 and checked to be a root-owned directory nobody
else can write; lock files opened O_NOFOLLOW), held until released or until the process dies (the kernel drops
flocks). A uid whose lock is held, or that any process runs as, is skipped. So two pools never share a uid: one's
kill-by-uid cannot hit the other's programs, and they never share an RLIMIT_NPROC budget.

Why a helper (measured, docs/sandbox_notes.md): the trainer cannot start a program under another uid cheaply and
safely itself. subprocess's `user=`/`group=` make CPython fork() instead of vfork(), and fork() copies the page tables
of the whole trainer: ~9 ms per program with JAX imported (200 MB resident); a run of `pass` took 100-223 ms from a
process holding 2 GB instead of ~25-35 ms: the cost grows with the trainer's memory. rlimits and the parent-death signal need code between fork and exec, and a Python
`preexec_fn` may deadlock in a threaded trainer, so the old chain exec'd util-linux's setpriv and prlimit in the
child (two more execs and dynamic loads, ~1.5 ms). The helper is a separate single-threaded Python process:
forking it (~13 MB) is cheap, and `preexec_fn` is safe in it (no other thread can hold a lock at fork time).

Protocol (AF_UNIX SOCK_SEQPACKET; one message = one datagram):
  trainer -> helper, control socket:  JSON {"argv", "uid" (int or null), "rlimits" [[name, soft, hard]], "env"}
                                      + 4 fds (SCM_RIGHTS): the child's stdin, stdout, stderr and a new per-run socket.
  helper -> trainer, per-run socket:  b"P<pid>" once the child has exec'd (so its uid is already dropped), or
                                      b"E<error>" if it could not be started; later b"X<exit code>" when the helper
                                      has reaped it (Popen's convention: -N = killed by signal N); then EOF.
  trainer -> helper, per-run socket:  b"K" = SIGKILL the run's process group if it is not yet reaped; EOF (the trainer
                                      abandoned the run) = SIGKILL its uid's processes and its process group. The
                                      helper is the child's parent and the only one that reaps it, so the group kill
                                      can never hit a recycled pid.

The child (in the helper's forked process, via subprocess.Popen): new session, fds 0-2 = the three pipe ends and
nothing else (close_fds), `env` as given (empty for bwrap), cwd /, supplementary groups dropped, gid and uid set to
`uid` on the host (real, effective and saved), then in `preexec_fn` - already unprivileged - PR_SET_PDEATHSIG=SIGKILL
(set after the uid change, which would clear it; the helper's only thread is its parent, so it fires when the helper
dies), a check that the helper is still its parent, and the rlimits (lowering only); then execve.

The helper exits - first SIGKILLing every run's uid and process group (their PDEATHSIG would kill the outer bwraps
anyway, but a namespace pid 1 still inside bwrap's set-up has no death signal armed yet) - when the control
socket reaches EOF (the trainer closed the launcher or died: the kernel closes a dead process's fds) or when its
parent is no longer the trainer (checked every second, for a trainer whose forked children keep the socket open).
It is a child subreaper (PR_SET_CHILD_SUBREAPER): a namespace's pid 1 orphaned by a killed outer bwrap is reparented
to it and reaped at once, instead of lingering as a zombie of the host's init that counts against RLIMIT_NPROC.

This file is run by path (`python -I -S sandbox_launcher.py`) and imports only the standard library.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_MAX_MSG = 1 << 20
DEFAULT_UID_BASE = 1_900_000_000
# Where the per-uid lock files live: the first entry whose parent directory exists (created root-only, 0700).
LOCK_DIRS = ("/run/dlmjax-sandbox", "/tmp/.dlmjax-sandbox-uids")
UID_SEARCH = 1 << 20  # how far above uid_base a pool looks for free uids
_UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to the kernel


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot isolate programs on this machine (bwrap missing, kernel refuses namespaces, not root, no
    free uids). Raised instead of ever running untrusted code unsandboxed. (Re-exported by dlmjax.rewards.sandbox.)"""


class LauncherError(RuntimeError):
    """The launcher helper cannot be started or has gone away."""


class SpawnError(OSError):
    """The helper could not start this program (exec failed, rlimit refused, ...); the message says why."""


def process_uids(uids) -> dict[int, int]:
    """{host pid: real uid} of the processes whose real uid is in `uids` (reads /proc/<pid>/status; processes
    vanishing meanwhile are skipped). Zombies are included: they still count against their uid's RLIMIT_NPROC."""
    uids = {int(u) for u in uids}
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        uid = int(line.split()[1])
                        if uid in uids:
                            found[int(name)] = uid
                        break
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_uids(uids) -> int:
    """SIGKILL every process whose real uid is in `uids` (the sandbox's uids are claimed exclusively, so all of them
    are ours); returns how many were found (zombies included)."""
    found = process_uids(uids)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(found)


# ------------------------------------------------------------------------------------------------ uid claims

def _lock_dir() -> str:
    """The directory of the per-uid lock files: the first of LOCK_DIRS whose parent exists, created 0700 and
    checked to be a real directory of ours that nobody else can write (else SandboxUnavailable: another user could
    otherwise pre-create it, or the lock files in it, to steer or block our uid claims)."""
    d = next((d for d in LOCK_DIRS if os.path.isdir(os.path.dirname(d))), LOCK_DIRS[-1])
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise SandboxUnavailable(f"cannot create the sandbox uid lock directory {d}: {e}") from e
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SandboxUnavailable(f"the sandbox uid lock directory {d} is not a directory owned by uid "
                                 f"{os.geteuid()} without group/other write access; refusing to claim uids there")
    return d


class UidLease:
    """Host uids claimed by one pool or sandbox: an exclusive flock on `<lock dir>/uid-<n>` for each, held until
    `release()` or until this process dies (the kernel drops flocks with the last fd)."""

    def __init__(self, uids: list[int], fds: list[int]):
        self.uids = uids
        self._fds = fds

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    @property
    def held(self) -> bool:
        return bool(self._fds)


def _try_lock(d: str, uids) -> tuple[list[int], int | None, str]:
    """Lock every uid of `uids`; on the first one that is taken (its lock is held, or a process of it is running),
    unlock all and return ([], that uid, why)."""
    fds = []
    for u in uids:
        path = os.path.join(d, f"uid-{u}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:  # e.g. ELOOP: not a regular file of ours
            for f in fds:
                os.close(f)
            raise SandboxUnavailable(f"cannot open the sandbox uid lock file {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            for f in fds:
                os.close(f)
            return [], u, "claimed by another sandbox pool"
        fds.append(fd)
    running = process_uids(uids)
    if running:
        for f in fds:
            os.close(f)
        u = max(running.values())
        return [], u, f"processes of it are running (pids {sorted(p for p, v in running.items() if v == u)})"
    return fds, None, ""


def claim_uids(n: int | None = None, base: int = DEFAULT_UID_BASE, *, uids=None) -> UidLease:
    """Claim host uids for sandboxed programs, exclusively across pools and processes on this host: `n` consecutive
    free uids, the first free run at or above `base` (searching UID_SEARCH uids up), or exactly `uids` (then a uid
    that is taken is an error). SandboxUnavailable when none can be claimed."""
    d = _lock_dir()
    if uids is not None:
        uids = [int(u) for u in uids]
        if not uids or len(set(uids)) != len(uids) or not all(0 < u <= _UID_MAX for u in uids):
            raise ValueError(f"sandbox uids must be distinct and in 1..{_UID_MAX}, got {uids}")
        fds, busy, why = _try_lock(d, uids)
        if busy is not None:
            raise SandboxUnavailable(f"sandbox uid {busy} is in use ({why})")
        return UidLease(uids, fds)
    if n is None or n < 1 or base < 1:
        raise ValueError(f"claim_uids needs n >= 1 and base >= 1, got n={n}, base={base}")
    u, end = base, min(base + UID_SEARCH, _UID_MAX + 1)
    while u + n <= end:
        fds, busy, _ = _try_lock(d, range(u, u + n))
        if busy is None:
            return UidLease(list(range(u, u + n)), fds)
        u = busy + 1
    raise SandboxUnavailable(f"no {n} consecutive free sandbox uids in [{base}, {end}) (lock files in {d})")



# ---------------------------------------------------------------------------------------------------- the helper

def _child_setup(libc, helper_pid: int, rlimits) -> None:
    """preexec_fn: runs in the forked child after the uid/gid drop, before execve. A failure is written to the
    child's stderr (the run's pipe) and the child exits 127 without exec'ing: the trainer sees a setup failure with
    that message (no start marker)."""
    what = "prctl(PR_SET_PDEATHSIG)"
    try:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if os.getppid() != helper_pid:  # the helper died before the death signal was armed
            os._exit(1)
        for name, soft, hard in rlimits:
            what = f"setrlimit({name}, {soft}, {hard})"
            resource.setrlimit(getattr(resource, name), (soft, hard))
    except BaseException as e:  # noqa: BLE001 - reported, never exec'd
        os.write(2, f"sandbox launcher: {what} failed: {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        os._exit(127)


def _serve(parent: int, ctl: socket.socket) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = os.getpid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so the wakeup fd is written
    if os.getppid() != parent:
        return
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ, "ctl")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    runs: dict[int, list] = {}  # pid -> [Popen, per-run socket or None, uid or None]

    def kill(pid, by_uid=False):
        ent = runs.get(pid)
        if ent is None:  # reaped already: the pid (and so its process group id) may have been recycled
            return
        if by_uid and ent[2] is not None:
            # Every process of the run's (exclusively claimed) uid: also a namespace pid 1 still inside bwrap's
            # set-up, whose --die-with-parent is not armed yet and would outlive the outer bwrap.
            kill_uids([ent[2]])
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

    def drop_sock(ent):
        if ent[1] is not None:
            sel.unregister(ent[1])
            ent[1].close()
            ent[1] = None

    def reap():
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ent = runs.pop(pid, None)
            if ent is None:  # an orphan reparented to us (we are a subreaper)
                continue
            ent[0].returncode = code = os.waitstatus_to_exitcode(status)  # so Popen never waits for it itself
            if ent[1] is not None:
                try:
                    ent[1].send(b"X%d" % code)
                except OSError:
                    pass
                drop_sock(ent)

    def spawn(msg, fds):
        sock = None
        try:
            if len(fds) != 4:
                raise SpawnError(f"expected 4 file descriptors, got {len(fds)}")
            sock = socket.socket(fileno=fds[3])
            req = json.loads(msg)
            uid = req["uid"]
            ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
            lims = [(str(n), int(s), int(h)) for n, s, h in req["rlimits"]]
            proc = subprocess.Popen(req["argv"], stdin=fds[0], stdout=fds[1], stderr=fds[2], close_fds=True,
                                    start_new_session=True, env=req["env"], cwd="/",
                                    preexec_fn=lambda: _child_setup(libc, me, lims), **ids)
        except Exception as e:  # noqa: BLE001 - reported to the trainer as this run's setup failure
            if sock is not None:
                try:
                    sock.send(b"E" + f"{type(e).__name__}: {e}".encode("utf-8", "replace")[:4000])
                except OSError:
                    pass
                sock.close()
            return
        finally:
            for fd in fds[:3]:
                os.close(fd)
        runs[proc.pid] = [proc, sock, uid]
        sel.register(sock, selectors.EVENT_READ, proc.pid)
        try:
            sock.send(b"P%d" % proc.pid)
        except OSError:  # the trainer already gave up on this run
            kill(proc.pid, by_uid=True)
            drop_sock(runs[proc.pid])

    try:
        ctl.send(b"R")
        while True:
            events = sel.select(1.0)
            if os.getppid() != parent:
                return
            for key, _ in events:
                if key.data == "ctl":
                    try:
                        msg, fds, _, _ = socket.recv_fds(ctl, _MAX_MSG, 4)
                    except OSError:
                        return
                    if not msg and not fds:  # EOF: the trainer closed the launcher or died
                        return
                    spawn(msg, fds)
                elif key.data == "wake":
                    try:
                        while os.read(wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    reap()
                else:
                    pid = key.data
                    try:
                        m = key.fileobj.recv(16)
                    except OSError:
                        m = b""
                    if pid in runs:
                        kill(pid, by_uid=not m)  # b"K" (the trainer killed the uid itself), or EOF: abandoned
                        if not m:
                            drop_sock(runs[pid])
    finally:  # the trainer closed the launcher or died: nothing of ours may outlive it
        for pid in list(runs):
            kill(pid, by_uid=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parent, fd = int(argv[0]), int(argv[1])
    _serve(parent, socket.socket(fileno=fd))


# ---------------------------------------------------------------------------------------------------- the client

class Run:
    """One started program, seen from the trainer: its host pid and the per-run socket to the helper."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.returncode: int | None = None
        self.eof = False  # the helper closed the run's socket (after sending the exit code, or because it died)
        self.killed = False  # kill() was called: whatever status follows is the host's doing
        self._lock = threading.Lock()  # kill() from another thread never sends on a closed (reused) fd

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        """Read one message from the helper (call when the socket is readable)."""
        try:
            m = self.sock.recv(64)
        except BlockingIOError:
            return
        except TimeoutError:  # from wait()'s socket timeout
            raise
        except OSError:
            m = b""
        if m.startswith(b"X"):
            self.returncode = int(m[1:])
        elif not m:
            self.eof = True

    def wait(self, timeout: float) -> bool:
        """Block until the helper closed the run's socket (the program was reaped) or `timeout`; True if done."""
        self.sock.settimeout(max(timeout, 0.0))
        try:
            while not self.eof:
                try:
                    self.on_readable()
                except TimeoutError:
                    return False
        finally:
            self.sock.settimeout(None)
        return True

    def kill(self) -> None:
        """Ask the helper to SIGKILL the run's process group unless it has been reaped (no recycled-pid risk)."""
        self.killed = True
        with self._lock:
            try:
                self.sock.send(b"K")
            except OSError:  # closed, or the helper already closed its end
                pass

    def close(self) -> None:
        with self._lock:
            self.sock.close()


class Launcher:
    """The trainer's end of one helper process. Thread-safe: `spawn` may be called from several threads; each run
    has its own socket. A helper that died (killed from outside) is restarted once per `spawn`."""

    def __init__(self, python: str | None = None, start_timeout: float = 30.0):
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen([self.python, "-I", "-S", os.path.abspath(__file__), str(os.getpid()),
                                     str(theirs.fileno())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    pass_fds=(theirs.fileno(),), start_new_session=True, env={}, cwd="/")
        except OSError as e:
            mine.close()
            raise LauncherError(f"cannot start the sandbox launcher ({self.python}): {e}") from e
        finally:
            theirs.close()
        mine.settimeout(self.start_timeout)
        try:
            ready = mine.recv(16)
        except OSError:
            ready = b""
        mine.settimeout(None)
        if ready != b"R":
            proc.kill()
            proc.wait()
            mine.close()
            raise LauncherError(f"the sandbox launcher ({self.python}) did not start (exit status {proc.returncode})")
        self._proc, self._sock = proc, mine

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # EOF: the helper kills what it still has and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def spawn(self, argv: list[str], fds: tuple[int, int, int], *, uid: int | None, rlimits, env: dict) -> Run:
        """Start `argv` with fds (stdin, stdout, stderr) as `uid` (None: as the helper's user) under `rlimits`
        ([(resource name, soft, hard)]). Returns once the program has exec'd. SpawnError if the helper could not
        start it; LauncherError if the helper is gone and cannot be restarted."""
        msg = json.dumps({"argv": argv, "uid": uid, "rlimits": [list(r) for r in rlimits], "env": env}).encode()
        for attempt in (0, 1):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with self._lock:
                    if self._closed:
                        raise LauncherError("the sandbox launcher is closed")
                    if self._proc is None or self._proc.poll() is not None:  # died: start a fresh helper
                        self._stop()
                        self._start()
                    try:
                        socket.send_fds(self._sock, [msg], [*fds, theirs.fileno()])
                        sent = True
                    except OSError:
                        sent = False
            except BaseException:
                mine.close()
                raise
            finally:
                theirs.close()
            reply = mine.recv(_MAX_MSG) if sent else b""
            if reply.startswith(b"P"):
                return Run(int(reply[1:]), mine)
            mine.close()
            if reply.startswith(b"E"):
                raise SpawnError(reply[1:].decode("utf-8", "replace"))
            # no reply: the helper died under us; the next attempt restarts it
        raise LauncherError("the sandbox launcher died twice while starting a program")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop()


if __name__ == "__main__":
    main()
