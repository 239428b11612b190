#!/usr/bin/env python
"""Sandbox benchmark (issue 14 §5): programs per second through the bubblewrap sandbox vs a bare subprocess, pool
throughput vs workers, and the start-up cost of one sandbox.

Programs: `--programs` short MBPP-like function programs (a small function + 3 asserts run by the code reward's
function driver, each doing `--work` loop iterations of integer arithmetic so the program does real work).
  bare     `subprocess.run([/usr/bin/python3, -I, -c, <program>])`, one at a time: what the reference's spawned
           process costs without any isolation. This is the goal's baseline (ratio column).
  bare -S  the same with `-I -S` (no site), as the sandbox's interpreter runs: the "isolation only" baseline.
  sandbox  the same programs through `Sandbox.run` (launcher helper -> fork, uid drop, rlimits -> bwrap with every
           namespace -> python3 -I -S), one at a time, interleaved with the bare runs (same load).
           ratio = s/program / bare s/program (sum over the programs).
  pool     the same programs through `SandboxPool(workers).map` for each `--workers`: programs/s.
  startup  median wall time of `Sandbox.run("pass")` (a sandbox that starts python and exits) vs bare `python3 -I
           [-S] -c pass`; the same with this process holding 1 GiB of touched memory (a trainer's size must not
           matter: the programs are forked by the small launcher helper, not by us); and the one-off cost of
           constructing a Sandbox (launcher start + probe run).

  .venv/bin/python bench/sandbox.py                        # defaults: 60 programs, workers 1,2,4
  .venv/bin/python bench/sandbox.py --programs 20 --workers 1,2 --reps 5   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import csv_list, markdown_table  # noqa: E402
from dlmjax.rewards import code as C  # noqa: E402
from dlmjax.rewards import sandbox as S  # noqa: E402


def programs(n: int, work: int) -> list[str]:
    """n distinct driver sources (function driver + job appended as a literal so bare and sandbox run the same text)."""
    out = []
    for i in range(n):
        prog = (f"def f(x):\n    s = 0\n    for k in range({work}):\n        s = (s + k * x) % 1000003\n"
                f"    return x + {i}\n")
        job = {"program": prog, "tests": [f"assert f(1) == {1 + i}", f"assert f(2) == {2 + i}", "assert f(0) >= 0"],
               "exit_pass": True, "nonce": f"n{i}"}
        src = C._FUNCTION_DRIVER.replace("json.loads(sys.stdin.buffer.read())", f"json.loads({json.dumps(job)!r})")
        out.append(src)
    return out


def bare(src: str, flags=("-I",)) -> None:
    r = subprocess.run([S.PYTHON, *flags, "-c", src], capture_output=True, timeout=30)
    assert r.returncode == 0 and b"[true, true, true]" in r.stdout, r


def boxed(box: S.Sandbox, src: str) -> None:
    r = box.run(src)
    assert r.ok and b"[true, true, true]" in r.stdout, r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=60)
    ap.add_argument("--work", type=int, default=20000, help="loop iterations per f() call (3 calls per program)")
    ap.add_argument("--workers", type=csv_list(int), default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=20, help="repetitions of the start-up measurement")
    a = ap.parse_args(argv)
    progs = programs(a.programs, a.work)
    print(f"# sandbox benchmark: {a.programs} programs, work {a.work}, cpu {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, bwrap {S.find_bwrap()}\n")

    t0 = time.perf_counter()
    box = S.Sandbox(S.SandboxLimits(timeout_s=30))
    construct = time.perf_counter() - t0
    for src in progs[:3]:  # warm the page cache
        bare(src)
        boxed(box, src)
    tb, tn, ts = [], [], []
    for src in progs:  # interleaved: all three see the same machine load
        t = time.perf_counter(); bare(src); tb.append(time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter(); bare(src, S.PYTHON_FLAGS); tn.append(time.perf_counter() - t)  # noqa: E702
        t = time.perf_counter(); boxed(box, src); ts.append(time.perf_counter() - t)  # noqa: E702
    rows = [[name, f"{1e3 * statistics.median(v):.1f}", f"{len(v) / sum(v):.1f}", f"{sum(v) / sum(tb):.2f}"]
            for name, v in (("bare subprocess", tb), ("bare subprocess, -I -S", tn), ("sandbox", ts))]
    print("## one at a time (same programs, interleaved)\n")
    print(markdown_table(["runner", "median ms/program", "programs/s", "ratio (time) vs bare"], rows))
    print(f"\nsandbox vs bare -I -S (isolation only): {sum(ts) / sum(tn):.2f}")

    def startup(reps):
        sb, sn, ss = [], [], []
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.run([S.PYTHON, "-I", "-c", "pass"], check=True)
            sb.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([S.PYTHON, *S.PYTHON_FLAGS, "-c", "pass"], check=True)
            sn.append(time.perf_counter() - t)
            t = time.perf_counter(); assert box.run("pass").ok; ss.append(time.perf_counter() - t)  # noqa: E702
        return [1e3 * statistics.median(v) for v in (sb, sn, ss)]

    mb, mn, ms = startup(a.reps)
    small, big = [], []  # alternating blocks, so both see the same load
    for _ in range(4):
        for _ in range(max(a.reps // 4, 2)):
            t = time.perf_counter(); assert box.run("pass").ok; small.append(time.perf_counter() - t)  # noqa: E702
        ballast = bytearray(1 << 30)
        for i in range(0, len(ballast), 4096):  # touch every page: a trainer's resident memory
            ballast[i] = 1
        for _ in range(max(a.reps // 4, 2)):
            t = time.perf_counter(); assert box.run("pass").ok; big.append(time.perf_counter() - t)  # noqa: E702
        del ballast
    box.close()
    print("\n## start-up (a program that does nothing)\n")
    print(markdown_table(["what", "median ms"], [
        ["bare python3 -I -c pass", f"{mb:.1f}"],
        ["bare python3 -I -S -c pass", f"{mn:.1f}"],
        ["sandbox run of 'pass'", f"{ms:.1f}"],
        ["sandbox overhead per program vs bare -I", f"{ms - mb:.1f}"],
        ["sandbox overhead per program vs bare -I -S", f"{ms - mn:.1f}"],
        ["sandbox run of 'pass' / same, this process holding 1 GiB (alternating blocks)",
         f"{1e3 * statistics.median(small):.1f} / {1e3 * statistics.median(big):.1f}"],
        ["Sandbox() construction (launcher + probe run)", f"{1e3 * construct:.1f}"]]))

    rows = []
    base = None
    for w in a.workers:
        with S.SandboxPool(w, S.SandboxLimits(timeout_s=30), uid_base=S.DEFAULT_UID_BASE + 1000) as pool:
            pool.map(progs[:w])  # warm
            t = time.perf_counter()
            res = pool.map(progs)
            dt = time.perf_counter() - t
        assert all(r.ok for r in res)
        rate = len(progs) / dt
        base = base or rate
        rows.append([w, f"{rate:.1f}", f"{rate / base:.2f}"])
    print("\n## pool throughput\n")
    print(markdown_table(["workers", "programs/s", "speed-up vs first"], rows))


if __name__ == "__main__":
    main()
