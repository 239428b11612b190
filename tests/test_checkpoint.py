"""Conversion: HF -> dlmjax -> HF bit-identical, loads in transformers, sharding, dtypes, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dlmjax.checkpoint import CheckpointError, export_hf, import_hf, inspect, load_checkpoint, save_checkpoint
from dlmjax.config import ConfigError
from tests.reference import hf_models as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_tensors(path):
    """{key: torch tensor} of an HF dir (single file or index)."""
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def _assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        bits = torch.int16 if a[k].element_size() == 2 else torch.int32
        assert torch.equal(a[k].view(bits), b[k].view(bits)), k


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


@pytest.mark.parametrize("family,tie,dtype", [("llada", False, torch.float32), ("llada", True, torch.bfloat16),
                                              ("dream", False, torch.bfloat16), ("sdar", False, torch.float32),
                                              ("llama", True, torch.float32), ("qwen2", False, torch.float32),
                                              ("qwen3", True, torch.bfloat16)])
def test_round_trip_bit_identical(tmp_path, family, tie, dtype):
    _, raw, sd = R.build(family, seed=11, tie=tie, dtype=dtype)
    R.write_hf_dir(str(tmp_path / "src"), raw, sd)
    import_hf(str(tmp_path / "src"), str(tmp_path / "a"))
    export_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
    _assert_bit_identical(_hf_tensors(str(tmp_path / "src")), _hf_tensors(str(tmp_path / "hf")))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "b"))
    with safe_open(str(tmp_path / "a" / "params.safetensors"), "numpy") as fa, \
            safe_open(str(tmp_path / "b" / "params.safetensors"), "numpy") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), k
    out_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    for key in (("d_model", "n_layers", "weight_tying") if family == "llada" else
                ("hidden_size", "num_hidden_layers", "tie_word_embeddings")):
        assert out_cfg[key] == raw[key], key
    assert out_cfg["model_type"] == raw["model_type"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_export_loads_in_transformers(tmp_path, family, imported):
    model, ckpt, raw, _ = imported(family)
    export_hf(ckpt, str(tmp_path / "hf"), max_shard_size="20KB")  # forces several shards + an index
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).logits.numpy(), model(x).logits.numpy())


@pytest.mark.parametrize("family,cls,cfg_cls", [("dream", Qwen2ForCausalLM, Qwen2Config),
                                                ("sdar", Qwen3ForCausalLM, Qwen3Config)])
def test_dllm_export_loads_into_hf_class(tmp_path, family, cls, cfg_cls, imported):
    """Dream / SDAR exports keep their own config keys; their tensors load into the built-in Qwen2 / Qwen3 class."""
    model, ckpt, raw, _ = imported(family)
    export_hf(ckpt, str(tmp_path / "hf"))
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_cfg["model_type"] == raw["model_type"]
    loaded = cls.from_pretrained(str(tmp_path / "hf"), config=model.config, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.randint(0, 90, (1, 7))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).logits.numpy(), model(x).logits.numpy())


def test_import_sharded_index_and_dtype(tmp_path):
    _, raw, sd = R.build("sdar", seed=5, dtype=torch.bfloat16)
    R.write_hf_dir(str(tmp_path / "src"), raw, sd, shard_keys=7)
    cfg = import_hf(str(tmp_path / "src"), str(tmp_path / "a"), dtype="float32")
    assert cfg.param_dtype == "float32"
    cfg2, params = load_checkpoint(str(tmp_path / "a"))
    assert params["layers"]["wq"].dtype == np.float32 and params["layers"]["wq"].shape[0] == cfg2.num_layers
    wq0 = sd["model.layers.1.self_attn.q_proj.weight"].float().numpy()  # [H*Dh, D]
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][1]).reshape(cfg2.hidden_size, -1), wq0.T)


def test_save_checkpoint_then_load_and_export(tmp_path, imported):
    model, ckpt, raw, _ = imported("qwen3")
    cfg, params = load_checkpoint(ckpt)
    save_checkpoint(cfg, params, str(tmp_path / "saved"))
    cfg2, params2 = load_checkpoint(str(tmp_path / "saved"))
    assert cfg2 == cfg
    export_hf(str(tmp_path / "saved"), str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.randint(0, 90, (1, 5))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(x).logits.numpy(), model(x).logits.numpy())


# ---------------------------------------------------------------- bad input: clear error, nothing left behind


def _src(tmp_path, family="llada", **kw):
    _, raw, sd = R.build(family, seed=2, **kw)
    return raw, sd


def _expect_failure(tmp_path, raw, sd, match, family="auto", exc=(CheckpointError, ConfigError), shard_keys=None):
    src = tmp_path / "src"
    R.write_hf_dir(str(src), raw, sd, shard_keys=shard_keys)
    with pytest.raises(exc, match=match):
        import_hf(str(src), str(tmp_path / "dst"), family=family)
    assert not os.path.exists(tmp_path / "dst")
    assert _leftovers(tmp_path) == []


def test_missing_key_is_named(tmp_path):
    raw, sd = _src(tmp_path)
    del sd["model.transformer.blocks.1.up_proj.weight"]
    _expect_failure(tmp_path, raw, sd, r"missing tensor 'model\.transformer\.blocks\.1\.up_proj\.weight'")


def test_wrong_shape_is_named(tmp_path):
    raw, sd = _src(tmp_path, family="dream")
    sd["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(7)
    _expect_failure(tmp_path, raw, sd, r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.bias' "
                                       r"has shape \[7\]")


def test_extra_key_names_the_file(tmp_path):
    raw, sd = _src(tmp_path, family="qwen3")
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    _expect_failure(tmp_path, raw, sd, r"model-0000\d-of-0000\d\.safetensors: unexpected tensor "
                                       r"'model\.layers\.0\.mlp\.extra\.weight'", shard_keys=10)


def test_config_weights_layer_mismatch(tmp_path):
    raw, sd = _src(tmp_path)
    raw["n_layers"] = 3
    _expect_failure(tmp_path, raw, sd, r"missing tensor 'model\.transformer\.blocks\.2\.")
    raw["n_layers"] = 1
    _expect_failure(tmp_path, raw, sd, r"unexpected tensor 'model\.transformer\.blocks\.1\..*with 1 layers")


def test_untied_config_with_tied_weights(tmp_path):
    raw, sd = _src(tmp_path, family="llama", tie=True)
    raw["tie_word_embeddings"] = False
    _expect_failure(tmp_path, raw, sd, r"missing tensor 'lm_head\.weight' \(config says tie_word_embeddings=false\)")


def test_unknown_family_and_bad_config_field(tmp_path):
    raw, sd = _src(tmp_path, family="llama")
    raw2 = {**raw, "model_type": "mystery", "architectures": ["MysteryLM"]}
    _expect_failure(tmp_path, raw2, sd, r"config\.json: cannot tell the model family.*mystery")
    _expect_failure(tmp_path, raw, sd, r"unknown family 'gpt2'", family="gpt2")
    raw3 = {**raw, "hidden_act": "gelu"}
    _expect_failure(tmp_path, raw3, sd, r"config\.json: field 'hidden_act'='gelu' is not supported")
    raw4 = {**raw, "num_attention_heads": "four"}
    _expect_failure(tmp_path, raw4, sd, r"config\.json: field 'num_attention_heads' must be an integer")


def test_truncated_safetensors(tmp_path):
    raw, sd = _src(tmp_path, family="qwen2")
    src = tmp_path / "src"
    R.write_hf_dir(str(src), raw, sd)
    fn = src / "model.safetensors"
    data = fn.read_bytes()
    fn.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        import_hf(str(src), str(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst") and _leftovers(tmp_path) == []


def test_existing_destination_is_kept(tmp_path, imported):
    _, ckpt, _, hf_dir = imported("qwen2")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="destination exists"):
        import_hf(hf_dir, str(dst))
    assert (dst / "keep.txt").read_text() == "mine"
    import_hf(hf_dir, str(dst), overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "params.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """An error while streaming tensors (after the output file was opened) removes the partial output."""
    from dlmjax.checkpoint import st_io

    raw, sd = _src(tmp_path, family="sdar")
    R.write_hf_dir(str(tmp_path / "src"), raw, sd)
    calls = {"n": 0}
    orig = st_io.TensorReader.get

    def flaky(self, key, index=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return orig(self, key, index)

    monkeypatch.setattr(st_io.TensorReader, "get", flaky)
    with pytest.raises(OSError, match="disk went away"):
        import_hf(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst") and _leftovers(tmp_path) == []


def test_cli_import_inspect_export_and_error(tmp_path, imported):
    _, _, _, hf_dir = imported("llada")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "convert", *a], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=120)
    r = run("import", "--src", hf_dir, "--dst", str(tmp_path / "c"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    r = run("inspect", str(tmp_path / "c"))
    assert r.returncode == 0 and "layers.wq" in r.stdout and "bfloat16" in r.stdout.lower()
    r = run("export", "--src", str(tmp_path / "c"), "--dst", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    assert "model.transformer.blocks.0.ff_out.weight" in _hf_tensors(str(tmp_path / "e"))
    r = run("import", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "x"))
    assert r.returncode == 2 and "nowhere" in r.stderr and not os.path.exists(tmp_path / "x")
    r = run("import", "--src", hf_dir)
    assert r.returncode == 2 and "--dst" in r.stderr
    r = run("import", "--help")
    assert r.returncode == 0 and "--family" in r.stdout and "--dtype" in r.stdout


def test_inspect_hf_dir(imported):
    _, _, _, hf_dir = imported("dream")
    text = inspect(hf_dir)
    assert "family dream" in text and "model.layers.1.self_attn.v_proj.bias" in text
