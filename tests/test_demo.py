"""README's first command: the demo trains a small dLLM from scratch and it really learns (accuracy far above
chance under all three decoders)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_learns_addition(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "dlmjax.launch", "--job=demo", f"--workdir={tmp_path}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {row["decoder"].split("(")[0]: row for row in res["rows"]}
    assert set(rows) == {"low_confidence", "dynamic", "tau_budget"}
    # chance: the 4-digit sum of two 3-digit numbers guessed digit by digit is right about once in 2,000 tries
    for name, row in rows.items():
        assert row["accuracy"] >= 0.3, (name, row)
        assert row["n"] == 256
    assert rows["low_confidence"]["mean_tpf"] == pytest.approx(1.0)
    assert rows["dynamic"]["mean_tpf"] > 2.0 and rows["tau_budget"]["mean_tpf"] > 2.0
    assert "| low_confidence |" in r.stdout and (tmp_path / "accuracy_vs_tpf.svg").exists()
    assert (tmp_path / "sft" / "final" / "params.safetensors").exists()
