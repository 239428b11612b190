"""Conversion streams one tensor at a time: peak anonymous memory of import and export stays far below the model size
(an 8B checkpoint must never need two full copies in host memory)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = textwrap.dedent("""
    import os, sys, threading, time, json
    def anon_kb():
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                return int(line.split()[1])
    from dlmjax.checkpoint import import_hf, export_hf
    import numpy, safetensors, ml_dtypes  # imports done before the baseline
    peak = [0]; stop = [False]
    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], anon_kb()); time.sleep(0.002)
    base = anon_kb(); t = threading.Thread(target=sample); t.start()
    if sys.argv[1] == 'import':
        import_hf(sys.argv[2], sys.argv[3])
    else:
        export_hf(sys.argv[2], sys.argv[3])
    stop[0] = True; t.join()
    print(json.dumps({"peak_increase_bytes": (peak[0] - base) * 1024}))
""")


@pytest.mark.slow
def test_import_and_export_stream(tmp_path):
    from safetensors.numpy import save_file

    nl, d, inter, vocab, h = 16, 512, 1536, 8192, 8
    rng = np.random.default_rng(0)
    sd = {"model.embed_tokens.weight": rng.standard_normal((vocab, d), np.float32),
          "model.norm.weight": np.ones(d, np.float32), "lm_head.weight": rng.standard_normal((vocab, d), np.float32)}
    for i in range(nl):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": np.ones(d, np.float32),
                   p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                   p + "mlp.gate_proj.weight": rng.standard_normal((inter, d), np.float32),
                   p + "mlp.up_proj.weight": rng.standard_normal((inter, d), np.float32),
                   p + "mlp.down_proj.weight": rng.standard_normal((d, inter), np.float32)})
        for n in "qkvo":
            sd[p + f"self_attn.{n}_proj.weight"] = rng.standard_normal((d, d), np.float32)
    total = sum(x.nbytes for x in sd.values())
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    del sd
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": d, "num_hidden_layers": nl, "num_attention_heads": h,
        "num_key_value_heads": h, "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "hidden_act": "silu"}))
    # a fixed mmap threshold makes freed large buffers go back to the OS at once, so RssAnon measures live data
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "131072"}
    for mode, a, b in (("import", src, tmp_path / "ours"), ("export", tmp_path / "ours", tmp_path / "back")):
        r = subprocess.run([sys.executable, "-c", _PROBE, mode, str(a), str(b)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peak = json.loads(r.stdout.strip().splitlines()[-1])["peak_increase_bytes"]
        # the largest single tensor is the 16 MB embedding; a non-streaming converter would hold >= 260 MB
        assert peak < 0.25 * total, f"{mode}: peak anonymous memory grew by {peak / 2**20:.0f} MiB " \
                                    f"for a {total / 2**20:.0f} MiB checkpoint"
