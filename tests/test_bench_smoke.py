"""Smoke test of bench/forward.py: the benchmark runs end to end (tiny model, tiny shapes) and prints its table.

It checks the script's plumbing (checkpoint build -> import -> load, both frameworks, the table and the JSON output)
and that torch and ours really hold the same weights (the agreement columns), not the timings.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_forward_bench_quick(tmp_path):
    out = tmp_path / "fwd.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "forward.py"), "--quick", "--tiny",
                           "--batch", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("dtype", "B", "L", "torch ms", "ours ms", "ratio", "compile s", "argmax agree"):
        assert col in header, header
    assert re.fullmatch(r"\|[-:|]+\|", lines[1]), lines[1]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert [(r["dtype"], r["B"], r["L"]) for r in rows] == [("float32", "1", "16"), ("bfloat16", "1", "16")]
    for r in rows:
        assert float(r["torch ms"]) > 0 and float(r["ours ms"]) > 0 and float(r["ratio"]) > 0
    data = json.loads(out.read_text())
    by_dtype = {r["dtype"]: r for r in data["rows"]}
    assert by_dtype["float32"]["max_rel_diff"] < 1e-4  # same weights, same f32 forward
    assert by_dtype["float32"]["argmax_agree"] == 1.0
    assert by_dtype["bfloat16"]["argmax_agree"] > 0.9
    assert data["machine"]["torch_attn_implementation"] == "sdpa"
