"""Smoke test of bench/train_step.py: both sides run end to end (tiny model, tiny shapes) and the table prints.

It checks the plumbing (checkpoints built and imported, the batch + shared noise, each side in its own process, the
tables and the JSON output) and that the two steps compute the same thing (the same loss and grad norm at every step:
same weights, same noise, bidirectional attention on both sides), not the timings.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from bench.common import markdown_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _tables(stdout: str) -> list[list[dict]]:
    return markdown_tables(stdout)


@pytest.mark.slow
def test_train_bench_tiny(tmp_path):
    out = tmp_path / "train.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    # one torch thread: on a loaded 2-core machine, torch's 2-thread barriers make tiny ops take milliseconds
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--tiny", "--layers", "1",
                           "--length", "32", "--batch", "2", "--reps", "2", "--warmup", "0", "--torch-threads", "1",
                           "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("command: `python bench/train_step.py --tiny"), text[:200]
    assert "machine: " in text and "torch 2" in text and "n/a on CPU" in text
    main, flops = _tables(text)
    assert len(main) == 1
    r = main[0]
    assert (r["B"], r["L"], r["layers"]) == ("2", "32", "1")
    for col in ("ours tok/s", "torch tok/s", "ratio ours/torch", "ratio (CPU s)", "ours peak RSS GiB",
                "torch peak RSS GiB"):
        v = float(r[col])
        assert math.isfinite(v) and v > 0, (col, r[col])
    assert float(r["loss rel diff (step 0)"]) < 1e-5
    assert float(r["grad-norm rel diff (step 0)"]) < 1e-4
    assert float(flops[0]["model GFLOP/step"]) > 0 and float(flops[0]["XLA GFLOP (cost_analysis)"]) > 0
    assert float(flops[0]["argument MiB"]) > 0
    data = json.loads(out.read_text())
    assert math.isfinite(data["ratio"]) and data["ratio"] > 0
    assert len(data["jax"]["loss"]) == len(data["torch"]["loss"]) == 2
    assert max(data["loss_rel_diff"]) < 1e-4  # same noise at every step, updates agree
    assert data["torch"]["bidirectional_delta"] > 0
    assert data["jax"]["memory_analysis"]["temp_size_in_bytes"] > 0
    assert data["jax"]["platform"] == "cpu"
