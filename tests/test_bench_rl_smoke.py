"""Smoke test of bench/rl_step.py: every section runs end to end (tiny model, smoke sizes) and prints its table.

It checks the plumbing (the random SDAR checkpoint built and imported, `run_rl` outer steps for SLIM-RL and TraceRL
with their time split, the update step on both frameworks, ours' rollout and both PyTorch loops, the tables and the
JSON) and that ours and PyTorch compute the same thing: the RL update's step-0 loss and grad norm agree (same
weights, same rows, same logp_old, the loss re-stated in torch from the spec) and the greedy rollouts decode the same
tokens. Not the timings.
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

HEADINGS = ("### Outer step: SLIM-RL vs TraceRL", "### RL update step: SLIM sequence loss, ours vs PyTorch",
            "### Rollout tokens/s: ours (decode.api.generate) vs PyTorch")


@pytest.mark.slow  # ~50-80 s on 2 loaded cores: each run_rl compiles its rollout, old-policy pass and update
def test_rl_bench_quick(tmp_path):
    out = tmp_path / "rl.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    # one torch thread: on a loaded 2-core machine, torch's 2-thread barriers make tiny ops take milliseconds
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "rl_step.py"), "--tiny", "--quick",
                           "--torch-threads", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("command: `python bench/rl_step.py --tiny --quick"), text[:200]
    assert "machine: " in text and "load average (1 min)" in text
    for h in HEADINGS:
        assert h in text, h
    tables = markdown_tables(text)
    assert len(tables) == 4
    outer, ratios, update, rollout = tables

    assert [(r["method"], r["K"]) for r in outer] == [("slim", "4"), ("tracerl", "4")]
    for r in outer:
        for col in ("rollout s", "old-policy s", "update s", "total s", "update ms / rollout"):
            v = float(r[col])
            assert math.isfinite(v) and v >= 0, (col, r[col])
        assert float(r["TPF"]) >= 1.0
    slim, trace = outer
    assert 2.0 <= float(slim["rows / rollout"]) <= 3.0  # 3 quadrature rows, dropped only when all targets are pads
    assert float(trace["rows / rollout"]) >= 1.0
    assert [r["K"] for r in ratios] == ["4"]
    assert float(ratios[0]["rows / rollout SLIM/TraceRL"]) == pytest.approx(
        float(slim["rows / rollout"]) / float(trace["rows / rollout"]), rel=1e-2)
    assert float(ratios[0]["update cost / rollout SLIM/TraceRL"]) > 0

    (u,) = update
    assert float(u["ours ms/step"]) > 0 and float(u["torch ms/step"]) > 0 and float(u["ratio torch/ours"]) > 0
    assert float(u["loss rel diff"]) < 1e-4  # same weights, rows and logp_old: the two losses agree
    assert float(u["grad-norm rel diff"]) < 1e-3
    assert float(u["logp max abs diff"]) < 1e-3

    assert [r["torch loop"] for r in rollout] == ["batched DynamicCache (bench/decode.py)",
                                                   "per-row reference (torch_loops.py)"]
    for r in rollout:
        assert r["tokens equal"] == "1.000"  # greedy, same weights: the same tokens
        assert float(r["ratio"]) > 0 and float(r["ours tok/s"]) > 0 and float(r["torch tok/s"]) > 0

    line = [ln for ln in text.splitlines() if ln.startswith("@@rl-bench-json ")]
    assert len(line) == 1
    blob = json.loads(line[0].split(" ", 1)[1])
    data = json.loads(out.read_text())
    assert set(data["results"]) == set(blob["results"]) == {"outer", "update", "rollout"}
    up = data["results"]["update"]
    assert up["loss_rel_diff"] < 1e-4 and len(up["ours_loss"]) == len(up["torch_loss"]) == 2
    assert up["ours_loss"][0] != 0.0  # the rows carry non-zero advantages and logp_old offsets
    for r in data["results"]["outer"]["rows"]:
        assert r["steps"] == 1 and r["rollouts"] == 4
        for k in ("rollout_s", "old_policy_s", "update_s", "update_per_rollout_ms"):  # the job's own timings
            assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
