"""Run `python -m dlmjax.launch ...` in a subprocess from the repo root (CPU backend), as a user would; and the
multi-process helpers (N launcher processes on localhost, their logs, TensorBoard scalars, exported params)."""

import glob
import os
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, timeout=900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "dlmjax.launch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- multi-process runs on localhost --------------------------------------------------------------------------------

def child_env(cache_dir=None):
    """The environment of a launcher child: CPU backend, one CPU device per process (the safe default with gloo; no
    fake-device flags from the parent), cheaper XLA CPU codegen (halves the compile time that dominates tiny runs;
    every run of a comparison uses the same flags) and, with cache_dir, a persistent compilation cache shared by the
    runs (a later run reuses an earlier one's compiled programs)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return env


class Procs:
    """Popen'ed launcher processes with stdout/stderr in files (no pipe can fill up and block a collective).
    program: what follows the interpreter (default `-m dlmjax.launch`; e.g. `-c <code>` for a wrapped launcher)."""

    def __init__(self, tmp, name, argvs, cache_dir=None, program=("-m", "dlmjax.launch")):
        self.logs, self.procs = [], []
        for i, argv in enumerate(argvs):
            out, err = tmp / f"{name}.{i}.out", tmp / f"{name}.{i}.err"
            self.logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(subprocess.Popen([sys.executable, *program, *argv], cwd=ROOT,
                                                   env=child_env(cache_dir), stdout=fo, stderr=fe))

    def wait(self, timeout, expect=0):
        """Return codes; on timeout every process is killed. A code other than `expect` -> pytest.fail with the
        stderr tails."""
        import pytest

        deadline = time.monotonic() + timeout
        codes = []
        try:
            for p in self.procs:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if codes is None or any(c != expect for c in codes):
            tails = "\n".join(f"--- process {i} rc={p.returncode} stderr tail ---\n{err.read_text()[-2500:]}"
                              for i, (p, (_, err)) in enumerate(zip(self.procs, self.logs)))
            pytest.fail(f"{'timeout' if codes is None else 'unexpected exit codes'}: {codes}\n{tails}")
        return codes

    def stdout(self, i=0):
        return self.logs[i][0].read_text()

    def stderr(self, i=0):
        return self.logs[i][1].read_text()


def mp_argvs(flagfile, workdir, n, *extra):
    """The argvs of n processes of one run on localhost (explicit --coordinator set-up, a free port)."""
    import portpicker

    port = portpicker.pick_unused_port()
    return [[f"--flagfile={flagfile}", f"--workdir={workdir}", "--distributed", f"--coordinator=127.0.0.1:{port}",
             f"--num_processes={n}", f"--process_id={i}", *extra] for i in range(n)]


def tb_scalars(tb_dir, tag="train/loss"):
    """{step: value} of one scalar tag from every TensorBoard event file in tb_dir (TFRecord framing, tensorboardX
    protos: no TensorFlow needed)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.tag == tag:
                    out[ev.step] = v.simple_value
    return out


def assert_params_close(a_dir, b_dir, init_dir=None, rtol=1e-5, atol=1e-6):
    """Two exported checkpoints hold the same config and (to tolerance) the same params; with init_dir, they also
    moved away from it (the comparison is not vacuous)."""
    import jax
    import numpy as np

    from dlmjax.checkpoint import load_checkpoint

    cfg_a, p_a = load_checkpoint(str(a_dir))
    cfg_b, p_b = load_checkpoint(str(b_dir))
    assert cfg_a == cfg_b
    init = jax.tree.leaves(load_checkpoint(str(init_dir))[1]) if init_dir else [None] * len(jax.tree.leaves(p_a))
    moved = False
    for (path, x), y, z in zip(jax.tree.leaves_with_path(p_a), jax.tree.leaves(p_b), init):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))
        moved |= z is not None and not np.array_equal(np.asarray(x), np.asarray(z))
    assert moved or init_dir is None


def script(name, *args, env=None):
    """Run launch/<name> (a bash launch script) with TPU / repo variables cleared unless given in env."""
    e = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "DLMJAX_REPO")}
    return subprocess.run(["bash", os.path.join(ROOT, "launch", name), *args], cwd=ROOT, env={**e, **(env or {})},
                          capture_output=True, text=True, timeout=60)
