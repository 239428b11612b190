"""Smoke test of bench/decode.py: every section runs end to end (tiny model, one shape) and prints its table.

It checks the plumbing (both random checkpoints built and imported, ours and the PyTorch loops, every table, the
JSON output) and that ours and the PyTorch loops decode the same tokens (the script asserts it; the table shows it),
not the timings.
"""

import json
import os
import subprocess
import sys

import pytest

from bench.common import markdown_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch")
pytest.importorskip("transformers")

HEADINGS = ("### Loop overhead", "### Ours vs the PyTorch loop", "### KV cache", "### Layer loop",
            "### Batch scaling", "### TPF and expected wrong commits", "### Profile of one SDAR iteration")


def _tables(stdout: str) -> list[list[dict]]:
    return markdown_tables(stdout)


def test_decode_bench_quick(tmp_path):
    out = tmp_path / "decode.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    # one torch thread: on a loaded 2-core machine, torch's 2-thread barriers make tiny ops take milliseconds
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "decode.py"), "--quick", "--tiny",
                           "--torch-threads", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("command: `python bench/decode.py --quick --tiny"), text[:200]
    assert "machine: " in text and "torch 2" in text
    for h in HEADINGS:
        assert h in text, h
    tables = _tables(text)
    assert len(tables) == len(HEADINGS)
    overhead, vs_torch, cache, layers, batch, quality, profile = tables
    assert [r["B"] for r in overhead] == ["1"] and float(overhead[0]["overhead ratio"]) > 0
    assert [r["decoder"] for r in vs_torch] == ["SDAR tau-budget", "SDAR dynamic", "LLaDA low-confidence"]
    for r in vs_torch:
        assert r["tokens equal"] == "1.000"
        assert float(r["ratio"]) > 0 and float(r["torch tok/s"]) > 0 and float(r["ours tok/s"]) > 0
    assert float(cache[0]["ours ms/fwd"]) > 0 and float(cache[0]["torch ms/fwd"]) > 0
    assert {r["dtype"] for r in layers} == {"float32", "bfloat16"}
    assert all(float(r["scan ms/fwd"]) > 0 and float(r["unrolled ms/fwd"]) > 0 for r in layers)
    assert float(batch[0]["tok/s"]) > 0
    assert {r["rule"] for r in quality} == {"dynamic", "tau_budget"}
    for r in quality:
        assert float(r["mean TPF"]) >= 1.0
    assert float(profile[0]["greedy + rule ms"]) > 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"overhead", "torch", "cache", "layers", "batch", "quality", "profile"}
    assert data["results"]["torch"][0]["torch_fwd"] > 0


def test_loop_iterations_from_rollout_equals_the_loops_own_count():
    """bench/decode.py times `decode.api.generate` and derives the SDAR loop's iteration count from the Rollout
    (max per-row n_forwards); the loop's own `iterations` counter (returned by block_generate) is the reference.
    Rows of different prompt lengths and stop ids make rows finish at different iterations."""
    import jax
    import numpy as np

    from bench.decode import loop_iterations
    from dlmjax.decode import api
    from dlmjax.decode.sdar import BlockDecodeConfig, block_generate
    from tests.workers import decode_mesh as W

    cfg, params = W.MODELS["sdar"], W.params("sdar")
    dc = BlockDecodeConfig(block_size=4, steps=4, max_new_tokens=12, rule="dynamic", tau=0.5, temperature=1.0,
                           stop_ids=(2,))
    left, aligned, lens = W.prompts([8, 5, 2, 6])
    key = jax.random.key(3)
    ro = api.generate(dc, cfg, params, left, lens, key)
    ref = block_generate(cfg, dc, params, aligned, lens, key)
    assert loop_iterations(ro) == int(ref["iterations"])
    assert len(set(np.asarray(ro.n_forwards).tolist())) > 1  # rows differ, so the max is not trivially everyone's
