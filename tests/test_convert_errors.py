"""Bad input to the conversion CLI, run as a user runs it (a subprocess of `python -m convert`).

Every case must end with exit status 2 and exactly one stderr line `error: ...` that names the culprit (file, key
or flag), no traceback and no help text, and nothing left at the destination (no directory, no `.tmp-` sibling,
no parent directory the run created). The read-only and full-disk destinations are real: a read-only bind mount and
small tmpfs mounts (the test is skipped, with the reason, only where the machine refuses to mount).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from dlmjax.checkpoint import import_hf
from tests.reference import hf_models as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "convert", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


def assert_error(r, *needles, dst=None):
    """Exit 2, one stderr line `error: ...` containing every needle, no traceback, nothing at `dst`."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr and r.stdout == "", (r.stdout, r.stderr)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if dst is not None:
        assert not os.path.lexists(dst), dst
        parent = os.path.dirname(os.path.abspath(dst))
        if os.path.isdir(parent):
            assert [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n or "probe" in n] == []
    return lines[0]


def _snapshot(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(path) for f in fs}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny Qwen3 HF dir, a tiny LLaDA HF dir and the dlmjax import of the Qwen3 one."""
    root = tmp_path_factory.mktemp("convert_errors")
    _, raw, sd = R.build("qwen3", seed=1)
    R.write_hf_dir(str(root / "qwen3_hf"), raw, sd)
    _, raw, sd = R.build("llada", seed=1)
    R.write_hf_dir(str(root / "llada_hf"), raw, sd)
    import_hf(str(root / "qwen3_hf"), str(root / "qwen3_ours"))
    return {"hf": str(root / "qwen3_hf"), "llada": str(root / "llada_hf"), "ours": str(root / "qwen3_ours")}


@contextlib.contextmanager
def mounted(opts: str, src: str | None = None):
    """A fresh mount point with `mount -o opts` (tmpfs, or a bind of `src`); unmounted and removed afterwards."""
    mp = tempfile.mkdtemp(prefix="dlmjax-mnt-")
    if src is None:
        cmds = [["mount", "-t", "tmpfs", "-o", opts, "tmpfs", mp]]
    else:  # a read-only bind needs a bind first, then a remount that adds ro
        cmds = [["mount", "--bind", src, mp], ["mount", "-o", f"remount,bind,{opts}", mp]]
    done = 0
    try:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"this machine refuses to mount ({' '.join(c[:3])}...: {r.stderr.strip()})")
            done += 1
        yield mp
    finally:
        if done:
            subprocess.run(["umount", mp], capture_output=True)
        os.rmdir(mp)


# ---------------------------------------------------------------- bad source / config


def test_config_json_is_a_list(tmp_path, ckpts):
    src = tmp_path / "src"
    shutil.copytree(ckpts["hf"], src)
    (src / "config.json").write_text(json.dumps([{"model_type": "qwen3"}]))
    assert_error(run("import", "--src", str(src), "--dst", str(tmp_path / "d")),
                 str(src / "config.json"), "JSON object", "list", dst=str(tmp_path / "d"))


def test_config_json_not_utf8(tmp_path, ckpts):
    src = tmp_path / "src"
    shutil.copytree(ckpts["hf"], src)
    (src / "config.json").write_bytes(b'{"model_type": "qwen3\xff"}')
    assert_error(run("import", "--src", str(src), "--dst", str(tmp_path / "d")),
                 str(src / "config.json"), "UTF-8", dst=str(tmp_path / "d"))


def test_wrong_family_says_which_family_the_config_looks_like(tmp_path, ckpts):
    line = assert_error(run("import", "--src", ckpts["llada"], "--dst", str(tmp_path / "d"), "--family", "qwen3"),
                        "config.json", "looks like a llada config", "--family llada", dst=str(tmp_path / "d"))
    assert "hidden_size" not in line
    assert_error(run("import", "--src", ckpts["hf"], "--dst", str(tmp_path / "d"), "--family", "llada"),
                 "config.json", "looks like a qwen3 config", "--family qwen3", dst=str(tmp_path / "d"))


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("size", ["0", "-1", "-5GB", "0MB", "abc", "inf"])
def test_max_shard_size_must_be_positive(tmp_path, ckpts, size):
    assert_error(run("export", "--src", ckpts["ours"], "--dst", str(tmp_path / "e"), f"--max-shard-size={size}"),
                 "--max-shard-size", repr(size), dst=str(tmp_path / "e"))


def test_usage_errors_are_one_line(tmp_path, ckpts):
    assert_error(run("import", "--src", ckpts["hf"]), "--dst", "--help")
    assert_error(run(), "import,export,inspect")
    assert_error(run("export", "--src", ckpts["ours"], "--dst", str(tmp_path / "e"), "--dtype", "int8"),
                 "--dtype", "int8", dst=str(tmp_path / "e"))
    r = run("export", "--help")
    assert r.returncode == 0 and "--max-shard-size" in r.stdout and r.stderr == ""


def test_runs_from_any_directory(tmp_path, ckpts):
    """`python -m convert` is installed with the package (pyproject include), not found only from the repo root."""
    r = run("import", "--src", ckpts["hf"], "--dst", str(tmp_path / "d"), cwd=str(tmp_path))
    assert "No module named convert" not in r.stderr, ("`convert` is not installed in this environment: a venv made "
                                                       "before pyproject's include had 'convert*' needs "
                                                       "`pip install -e .` again (launch/env.sh does it)")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "d" / "params.safetensors")
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dlmjax-convert"), "inspect",
                        str(tmp_path / "d")], cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "layers.wq" in r.stdout, r.stderr


# ---------------------------------------------------------------- destination vs source


def test_export_onto_its_source_is_refused(tmp_path, ckpts):
    src = str(tmp_path / "ours")
    shutil.copytree(ckpts["ours"], src)
    before = _snapshot(src)
    assert_error(run("export", "--src", src, "--dst", src, "--overwrite"), src, "source")
    assert_error(run("export", "--src", src, "--dst", os.path.join(src, "hf"), "--overwrite"), "inside",
                 dst=os.path.join(src, "hf"))
    assert_error(run("export", "--src", src, "--dst", str(tmp_path), "--overwrite"), "contains the source")
    assert_error(run("import", "--src", ckpts["hf"], "--dst", ckpts["hf"], "--overwrite"), ckpts["hf"], "source")
    assert _snapshot(src) == before


# ---------------------------------------------------------------- read-only and full destinations


def test_read_only_destination(tmp_path, ckpts):
    target = tmp_path / "target"
    target.mkdir()
    with mounted("ro", src=str(target)) as mp:
        dst = os.path.join(mp, "out")
        assert_error(run("export", "--src", ckpts["ours"], "--dst", dst), dst, "Read-only file system", dst=dst)
        dst2 = os.path.join(mp, "a", "b", "c")  # parents that cannot be created either
        assert_error(run("import", "--src", ckpts["hf"], "--dst", dst2), dst2, "Read-only", dst=dst2)
        assert os.listdir(mp) == []


def test_full_destination_is_refused_before_writing(tmp_path, ckpts):
    with mounted("size=64k") as mp:
        dst = os.path.join(mp, "new", "out")  # a parent the run would create must not stay behind either
        assert_error(run("export", "--src", ckpts["ours"], "--dst", dst), dst, "MiB free", dst=dst)
        assert_error(run("import", "--src", ckpts["hf"], "--dst", dst), dst, "MiB free", dst=dst)
        assert os.listdir(mp) == []


def test_disk_full_while_writing(tmp_path, ckpts):
    """Room for the bytes but only two free inodes: the export's second file fails with ENOSPC at write time."""
    with mounted("size=16m,nr_inodes=3") as mp:
        dst = os.path.join(mp, "out")
        assert_error(run("export", "--src", ckpts["ours"], "--dst", dst), dst, "No space left on device",
                     "nothing was left", dst=dst)
        assert os.listdir(mp) == []
