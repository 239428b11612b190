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


@pytest.mark.parametrize("digits,why", [(1, "allows 50 distinct problems"), (2, "allows 5000 distinct problems"),
                                        (5, "cannot hold a 5-digit worked answer")])
def test_demo_digits_out_of_range_is_one_error_line(tmp_path, digits, why):
    """--demo_digits the demo cannot serve: one `error:` line naming the flag, exit 2, nothing written."""
    from tests.launcher import launch

    w = tmp_path / "w"
    r = launch("--job=demo", f"--demo_digits={digits}", f"--workdir={w}", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not w.exists()
