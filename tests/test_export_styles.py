"""Export gives back a config that loads the way the source did, for every family and both config styles.

A checkpoint comes in one of two config styles:
  released             the family's own release: LLaDA's keys (model_type llada), Dream (model_type Dream), SDAR
                       (model_type sdar), each with an auto_map that names its remote code (configuration_*.py,
                       modeling_*.py next to the weights); loaded with trust_remote_code
  transformers-typed   a checkpoint saved from a built-in transformers class: Qwen2ForCausalLM (model_type qwen2)
                       imported with --family dream, Qwen3ForCausalLM (qwen3) with --family sdar, and the plain
                       Llama / Qwen2 / Qwen3 AR families (their released style is this one)
LLaDA has no transformers class (its tensor names are OLMo's), so it has only the released style.

Each case: source dir -> import (the family given explicitly, as a user would) -> export; the export's identity keys
(model_type, architectures, auto_map) and remote code match the source's, the export loads through the same
transformers entry point as the source with no missing or unexpected weights, and its logits equal the source's
bit for bit. The remote code here is a small stand-in for the released files (same class names, same tensor names)
so the test runs offline; what matters is that the export is found and loaded by the same classes as the source.
"""

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from dlmjax.checkpoint import export_hf, import_hf
from tests.reference import hf_models as R

# ---------------------------------------------------------------- stand-ins for the released remote code

_LLADA_CONFIG = '''
from transformers import PreTrainedConfig


class LLaDAConfig(PreTrainedConfig):
    model_type = "llada"
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    n_layers: int = 2
    mlp_hidden_size: int = 128
    embedding_size: int = 96
    vocab_size: int = 96
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    include_qkv_bias: bool = False
    weight_tying: bool = False
'''

_LLADA_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_llada import LLaDAConfig


class _RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _Block(nn.Module):
    """LLaDA block with LLaDA's tensor names: bidirectional attention, half-split RoPE, SwiGLU."""

    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.dh, self.theta = c.n_heads, c.n_kv_heads, c.d_model // c.n_heads, c.rope_theta
        d, f = c.d_model, c.mlp_hidden_size
        self.attn_norm, self.ff_norm = _RMSNorm(d, c.rms_norm_eps), _RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.h * self.dh, bias=c.include_qkv_bias)
        self.k_proj = nn.Linear(d, self.kv * self.dh, bias=c.include_qkv_bias)
        self.v_proj = nn.Linear(d, self.kv * self.dh, bias=c.include_qkv_bias)
        self.attn_out = nn.Linear(self.h * self.dh, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def _rope(self, x):
        half = self.dh // 2
        inv = 1.0 / self.theta ** (torch.arange(half, dtype=torch.float32) / half)
        ang = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv[None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)

    def forward(self, x):
        b, n, _ = x.shape
        y = self.attn_norm(x)
        q = self._rope(self.q_proj(y).view(b, n, self.h, self.dh).transpose(1, 2))
        k = self._rope(self.k_proj(y).view(b, n, self.kv, self.dh).transpose(1, 2))
        v = self.v_proj(y).view(b, n, self.kv, self.dh).transpose(1, 2)
        k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, -1) @ v
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, n, -1))
        y = self.ff_norm(x)
        return x + self.ff_out(nn.functional.silu(self.ff_proj(y)) * self.up_proj(y))


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.embedding_size, c.d_model),
            blocks=nn.ModuleList([_Block(c) for _ in range(c.n_layers)]),
            ln_f=_RMSNorm(c.d_model, c.rms_norm_eps),
            ff_out=nn.Linear(c.d_model, c.embedding_size, bias=False)))
        self.post_init()

    def forward(self, input_ids, **kw):
        t = self.model.transformer
        x = t.wte(input_ids)
        for blk in t.blocks:
            x = blk(x)
        return CausalLMOutput(logits=t.ff_out(t.ln_f(x)))
'''

_QWEN_STANDIN = '''
from transformers import {base}Config, {base}ForCausalLM


class {cfg}({base}Config):
    model_type = "{model_type}"


class {cls}({base}ForCausalLM):
    config_class = {cfg}
'''

REMOTE = {  # family -> (auto_map, {file: source}, transformers entry point the release documents)
    "llada": ({"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
               "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
              {"configuration_llada.py": _LLADA_CONFIG, "modeling_llada.py": _LLADA_MODEL}, AutoModel),
    "dream": ({"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
              {"configuration_dream.py": "from .modeling_dream import DreamConfig\n",
               "modeling_dream.py": _QWEN_STANDIN.format(base="Qwen2", cfg="DreamConfig", cls="DreamModel",
                                                         model_type="Dream")}, AutoModel),
    "sdar": ({"AutoConfig": "configuration_sdar.SDARConfig", "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
             {"configuration_sdar.py": "from .modeling_sdar import SDARConfig\n",
              "modeling_sdar.py": _QWEN_STANDIN.format(base="Qwen3", cfg="SDARConfig", cls="SDARForCausalLM",
                                                       model_type="sdar")}, AutoModelForCausalLM),
}

IDENTITY = ("model_type", "architectures", "auto_map")
CASES = [("llada", "released"), ("dream", "released"), ("dream", "transformers"), ("sdar", "released"),
         ("sdar", "transformers"), ("llama", "transformers"), ("qwen2", "transformers"), ("qwen3", "transformers")]
_TYPED_BUILD = {"dream": "qwen2", "sdar": "qwen3"}  # family -> the transformers class its typed checkpoints use


def _source(root, family: str, style: str) -> tuple[str, object, bool]:
    """Write the source checkpoint dir; (path, transformers entry point, needs remote code)."""
    src = os.path.join(root, f"{family}_{style}_src")  # unique names: remote code is cached per directory name
    if style == "released" and family in REMOTE:
        auto_map, files, entry = REMOTE[family]
        model, raw, sd = R.build(family, seed=3)
        raw["auto_map"] = auto_map
        if family == "llada":
            raw["rope_theta"] = 500000.0
        R.write_hf_dir(src, raw, sd)
        for fn, text in files.items():
            with open(os.path.join(src, fn), "w") as f:
                f.write(textwrap.dedent(text))
        return src, entry, True
    model, raw, sd = R.build(_TYPED_BUILD.get(family, family), seed=3)
    raw.setdefault("architectures", [type(model).__name__])
    if family in ("dream", "sdar"):
        raw["mask_token_id"] = R.TINY["vocab_size"] - 1  # a diffusion family needs one; Qwen configs keep extra keys
    R.write_hf_dir(src, raw, sd)
    return src, AutoModelForCausalLM, False


def _load(path, entry, remote):
    model, info = entry.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote,
                                        output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith("rotary_emb.inv_freq")]
    assert not missing and not info["unexpected_keys"] and not info["mismatched_keys"], (path, info)
    return model.eval()


@pytest.mark.parametrize("family,style", CASES)
def test_export_loads_like_the_source(tmp_path, family, style):
    src, entry, remote = _source(str(tmp_path), family, style)
    ours, out = str(tmp_path / f"{family}_{style}_ours"), str(tmp_path / f"{family}_{style}_export")
    cfg = import_hf(src, ours, family=family)
    assert cfg.family == family
    export_hf(ours, out)

    raw_src = json.load(open(os.path.join(src, "config.json")))
    raw_out = json.load(open(os.path.join(out, "config.json")))
    assert {k: raw_out.get(k) for k in IDENTITY} == {k: raw_src.get(k) for k in IDENTITY}
    py_src = sorted(f for f in os.listdir(src) if f.endswith(".py"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".py")) == py_src

    a, b = _load(src, entry, remote), _load(out, entry, remote)
    assert type(a).__name__ == type(b).__name__ == raw_src["architectures"][0]  # the class the source names
    x = torch.randint(0, R.TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(input_ids=x).logits.numpy(), b(input_ids=x).logits.numpy()
    assert np.isfinite(la).all() and la.std() > 0.1
    np.testing.assert_array_equal(lb, la)

    # and back: the export imports (with the same --family) to the same dlmjax config
    assert import_hf(out, str(tmp_path / "again"), family=family) == cfg


def test_generated_config_without_source_uses_family_defaults():
    """With no source config (a model built from a ModelConfig), the family's released identity is written."""
    from dlmjax.config import from_hf_config, to_hf_config

    _, raw, _ = R.build("sdar")
    cfg = from_hf_config(raw)
    out = to_hf_config(cfg)
    assert out["model_type"] == "sdar" and out["architectures"] == ["SDARForCausalLM"] and "auto_map" not in out


def test_saved_model_keeps_the_source_identity(tmp_path):
    """A model written by save_checkpoint with its source checkpoint as tokenizer_dir (what training does) exports
    like the source: a Qwen3ForCausalLM checkpoint trained as family sdar loads as Qwen3ForCausalLM again."""
    from dlmjax.checkpoint import load_checkpoint, save_checkpoint

    src, entry, remote = _source(str(tmp_path), "sdar", "transformers")
    import_hf(src, str(tmp_path / "ours"), family="sdar")
    cfg, params = load_checkpoint(str(tmp_path / "ours"))
    save_checkpoint(cfg, params, str(tmp_path / "trained"), tokenizer_dir=str(tmp_path / "ours"))
    export_hf(str(tmp_path / "trained"), str(tmp_path / "export"))
    raw_out = json.load(open(tmp_path / "export" / "config.json"))
    assert raw_out["model_type"] == "qwen3" and raw_out["architectures"] == ["Qwen3ForCausalLM"]
    a, b = _load(src, entry, remote), _load(str(tmp_path / "export"), entry, remote)
    x = torch.randint(0, R.TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_array_equal(b(input_ids=x).logits.numpy(), a(input_ids=x).logits.numpy())
