"""ModelConfig: one frozen description of every supported transformer, built once from a released config.json.

Families (see BUILD_NOTES.md, "Families"):
  llada  LLaDA-8B (bidirectional, Llama-style, OLMo key names)      dream  Dream-v0-7B (bidirectional, Qwen2, qkv bias)
  sdar   SDAR / TraDo (block-causal, Qwen3, q/k RMSNorm)           llama / qwen2 / qwen3  plain causal AR models
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

FAMILIES = ("llada", "dream", "sdar", "llama", "qwen2", "qwen3")
ATTENTION_KINDS = ("bidirectional", "causal", "block_causal")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")

# model_type (lower-cased) -> family, for --family auto.
_MODEL_TYPE_TO_FAMILY = {"llada": "llada", "dream": "dream", "sdar": "sdar", "llama": "llama", "qwen2": "qwen2",
                         "qwen3": "qwen3"}


class ConfigError(ValueError):
    """A config.json that dlmjax cannot represent exactly; the message names the field and the file."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + numerics of one decoder-only transformer. Shapes follow from these fields alone."""

    family: str
    vocab_size: int  # rows of the embedding / lm head (LLaDA: embedding_size, padded)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_full_precision: bool = False  # LLaDA: rotate q/k in f32, then cast back (spec N3)
    qkv_bias: bool = False  # Dream / Qwen2
    qk_norm: bool = False  # SDAR / Qwen3: per-head RMSNorm on q and k before RoPE
    tie_word_embeddings: bool = False
    attention: str = "causal"  # default mask kind of the family
    block_size: int = 0  # block-causal block length (SDAR); 0 = none
    logit_shift: bool = False  # Dream: position i is predicted by logits at i-1 (see model.shift_logits)
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"  # storage / master dtype of params
    compute_dtype: str = "float32"  # dtype of activations and matmul inputs
    remat: str = "none"  # activation checkpointing policy of the layer scan body

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"ModelConfig.{field}: {why}")

        if self.family not in FAMILIES:
            bad("family", f"{self.family!r} is not one of {FAMILIES}")
        if self.attention not in ATTENTION_KINDS:
            bad("attention", f"{self.attention!r} is not one of {ATTENTION_KINDS}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")
        for f in ("param_dtype", "compute_dtype"):
            if getattr(self, f) not in DTYPES:
                bad(f, f"{getattr(self, f)!r} is not one of {DTYPES}")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f, f"must be a positive int, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.attention == "block_causal" and self.block_size <= 0:
            bad("block_size", "block_causal attention needs block_size > 0")

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def param_shapes(cfg: ModelConfig) -> dict:
    """Shape of every parameter of the params pytree (pure Python: the converter needs no JAX)."""
    nl, d, hq, hkv, dh, i = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size)
    layers = {"attn_norm": (nl, d), "wq": (nl, d, hq, dh), "wk": (nl, d, hkv, dh), "wv": (nl, d, hkv, dh),
              "wo": (nl, hq, dh, d), "mlp_norm": (nl, d), "w_gate": (nl, d, i), "w_up": (nl, d, i),
              "w_down": (nl, i, d)}
    if cfg.qkv_bias:
        layers.update(bq=(nl, hq, dh), bk=(nl, hkv, dh), bv=(nl, hkv, dh))
    if cfg.qk_norm:
        layers.update(q_norm=(nl, dh), k_norm=(nl, dh))
    shapes = {"embed": (cfg.vocab_size, d), "layers": layers, "final_norm": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# From a released config.json


def detect_family(raw: Mapping[str, Any], source: str = "config.json") -> str:
    mt = str(raw.get("model_type", "")).lower()
    if mt in _MODEL_TYPE_TO_FAMILY:
        return _MODEL_TYPE_TO_FAMILY[mt]
    archs = " ".join(raw.get("architectures") or []).lower()
    for key, fam in (("llada", "llada"), ("dream", "dream"), ("sdar", "sdar")):
        if key in archs:
            return fam
    raise ConfigError(f"{source}: cannot tell the model family from model_type={raw.get('model_type')!r} "
                      f"architectures={raw.get('architectures')!r}; pass --family explicitly "
                      f"(one of {FAMILIES})")


class _Reader:
    """Reads keys from a raw config dict and tracks which ones were consumed; errors name the key and file."""

    def __init__(self, raw: Mapping[str, Any], source: str):
        self.raw, self.source = raw, source

    def get(self, key, default=None, *, required=False, kind=None):
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise ConfigError(f"{self.source}: required field {key!r} is missing")
            return default
        v = self.raw[key]
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{self.source}: field {key!r} must be an integer, got {v!r}")
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{self.source}: field {key!r} must be a number, got {v!r}")
            v = float(v)
        elif kind is bool and not isinstance(v, bool):
            raise ConfigError(f"{self.source}: field {key!r} must be true/false, got {v!r}")
        return v

    def expect(self, key, allowed, default):
        v = self.raw.get(key, default)
        if v is None:
            v = default
        if v not in allowed:
            raise ConfigError(f"{self.source}: field {key!r}={v!r} is not supported (dlmjax supports {allowed})")
        return v


def _token_id(r: _Reader, key: str):
    v = r.raw.get(key)
    if isinstance(v, list):  # generation configs list several eos ids; the model config keeps the first
        v = v[0] if v else None
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{r.source}: field {key!r} must be a token id, got {v!r}")
    return v


def _rope_theta(r: _Reader, default: float) -> float:
    """Both the old top-level `rope_theta` and the transformers-v5 `rope_parameters` form; no scaling supported."""
    rp = r.raw.get("rope_parameters")
    scaling = r.raw.get("rope_scaling")
    if isinstance(rp, Mapping):
        if rp.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"{r.source}: rope_parameters.rope_type={rp.get('rope_type')!r} is not supported "
                              "(only unscaled RoPE)")
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    if isinstance(scaling, Mapping) and scaling.get("rope_type", scaling.get("type")) not in ("default", None):
        raise ConfigError(f"{r.source}: rope_scaling={scaling!r} is not supported (only unscaled RoPE)")
    return r.get("rope_theta", default, kind=float)


def _from_llada(r: _Reader, **common) -> ModelConfig:
    r.expect("block_type", ("llama",), "llama")
    r.expect("activation_type", ("silu",), "silu")
    r.expect("layer_norm_type", ("rms",), "rms")
    for key in ("include_bias", "attention_layer_norm", "alibi", "scale_logits", "input_emb_norm",
                "bias_for_layer_norm", "multi_query_attention"):
        r.expect(key, (False,), False)
    r.expect("rope", (True,), True)
    r.expect("block_group_size", (1,), 1)
    if r.raw.get("clip_qkv") is not None:
        raise ConfigError(f"{r.source}: field 'clip_qkv' is not supported")
    d = r.get("d_model", required=True, kind=int)
    h = r.get("n_heads", required=True, kind=int)
    if d % h:
        raise ConfigError(f"{r.source}: d_model={d} is not divisible by n_heads={h}")
    inter = r.get("mlp_hidden_size", kind=int)
    if inter is None:
        inter = r.get("mlp_ratio", 4, kind=int) * d
    vocab = r.get("embedding_size", kind=int) or r.get("vocab_size", required=True, kind=int)
    if vocab < r.get("vocab_size", 0, kind=int):
        raise ConfigError(f"{r.source}: embedding_size={vocab} is smaller than vocab_size={r.raw['vocab_size']}")
    return ModelConfig(
        family="llada", vocab_size=vocab, hidden_size=d, num_layers=r.get("n_layers", required=True, kind=int),
        num_heads=h, num_kv_heads=r.get("n_kv_heads", h, kind=int), head_dim=d // h, intermediate_size=inter,
        rms_norm_eps=r.get("rms_norm_eps", 1e-5, kind=float), rope_theta=_rope_theta(r, 10000.0),
        rope_full_precision=r.get("rope_full_precision", True, kind=bool),
        qkv_bias=r.get("include_qkv_bias", False, kind=bool), tie_word_embeddings=r.get("weight_tying", False,
                                                                                          kind=bool),
        attention="bidirectional", max_position_embeddings=r.get("max_sequence_length", 4096, kind=int), **common)


def _from_hf(r: _Reader, family: str, **common) -> ModelConfig:
    act = r.raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{r.source}: field 'hidden_act'={act!r} is not supported (only silu / SwiGLU)")
    if r.raw.get("use_sliding_window"):
        raise ConfigError(f"{r.source}: field 'use_sliding_window'=true is not supported")
    if r.raw.get("mlp_bias"):
        raise ConfigError(f"{r.source}: field 'mlp_bias'=true is not supported")
    lt = r.raw.get("layer_types")
    if lt and any(t != "full_attention" for t in lt):
        raise ConfigError(f"{r.source}: field 'layer_types' contains non-full attention layers: {sorted(set(lt))}")
    d = r.get("hidden_size", required=True, kind=int)
    h = r.get("num_attention_heads", required=True, kind=int)
    head_dim = r.get("head_dim", kind=int)
    if head_dim is None:
        if d % h:
            raise ConfigError(f"{r.source}: hidden_size={d} is not divisible by num_attention_heads={h} "
                              "and no head_dim is given")
        head_dim = d // h
    attn_bias = r.get("attention_bias", False, kind=bool)
    if family in ("dream", "qwen2"):
        qkv_bias = True  # hard-coded bias=True on q/k/v in Qwen2 and Dream (spec §3.4); o_proj has none
        if attn_bias:
            raise ConfigError(f"{r.source}: field 'attention_bias'=true is not used by {family}; refusing to guess")
    elif attn_bias:
        raise ConfigError(f"{r.source}: field 'attention_bias'=true (bias on q/k/v/o) is not supported for {family}")
    else:
        qkv_bias = False
    attention = {"dream": "bidirectional", "sdar": "block_causal"}.get(family, "causal")
    block = r.get("block_size", 4, kind=int) if family == "sdar" else 0
    return ModelConfig(
        family=family, vocab_size=r.get("vocab_size", required=True, kind=int), hidden_size=d,
        num_layers=r.get("num_hidden_layers", required=True, kind=int), num_heads=h,
        num_kv_heads=r.get("num_key_value_heads", h, kind=int), head_dim=head_dim,
        intermediate_size=r.get("intermediate_size", required=True, kind=int),
        rms_norm_eps=r.get("rms_norm_eps", 1e-6, kind=float), rope_theta=_rope_theta(r, 10000.0),
        qkv_bias=qkv_bias, qk_norm=family in ("sdar", "qwen3"),
        tie_word_embeddings=r.get("tie_word_embeddings", False, kind=bool), attention=attention, block_size=block,
        logit_shift=family == "dream", max_position_embeddings=r.get("max_position_embeddings", 4096, kind=int),
        **common)


_DEFAULT_MASK_IDS = {"dream": 151666, "sdar": 151669, "llada": 126336}


def _json_kind(v) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")


def _check_key_style(raw: Mapping[str, Any], family: str, source: str):
    """An explicit family whose key names the config does not use (LLaDA's d_model/n_layers vs the transformers
    hidden_size/num_hidden_layers) is a wrong --family, not a missing field: say which family the config looks like."""
    llada_keys = "d_model" in raw or "n_layers" in raw
    hf_keys = "hidden_size" in raw or "num_hidden_layers" in raw
    if (family == "llada") == llada_keys or llada_keys == hf_keys:
        return  # matching style, or no style to judge by (the field checks name what is missing)
    try:
        guess = detect_family(raw, source)
    except ConfigError:
        guess = "llada" if llada_keys else "a transformers-style family (llama, qwen2, qwen3, dream, sdar)"
    if guess == family:  # model_type agrees with --family but the keys do not: let the field checks speak
        return
    style = "LLaDA keys (d_model, n_layers)" if llada_keys else "transformers keys (hidden_size, num_hidden_layers)"
    raise ConfigError(f"{source}: looks like a {guess} config (model_type={raw.get('model_type')!r}, {style}), "
                      f"not {family}; pass --family {guess if guess in FAMILIES else 'auto'}")


def from_hf_config(raw: Mapping[str, Any], family: str = "auto", source: str = "config.json",
                   **overrides) -> ModelConfig:
    """Build a ModelConfig from a released config.json dict. `overrides` set numerics fields (dtypes, remat)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object (key: value pairs) at the top level, "
                          f"got a JSON {_json_kind(raw)}")
    if family == "auto":
        family = detect_family(raw, source)
    if family not in FAMILIES:
        raise ConfigError(f"{source}: unknown family {family!r} (one of {FAMILIES} or 'auto')")
    _check_key_style(raw, family, source)
    r = _Reader(raw, source)
    mask = _token_id(r, "mask_token_id")
    if mask is None:
        mask = _DEFAULT_MASK_IDS.get(family)
    common = dict(mask_token_id=mask, eos_token_id=_token_id(r, "eos_token_id"),
                  pad_token_id=_token_id(r, "pad_token_id"), bos_token_id=_token_id(r, "bos_token_id"))
    cfg = _from_llada(r, **common) if family == "llada" else _from_hf(r, family, **common)
    if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise ConfigError(f"{source}: mask_token_id={cfg.mask_token_id} is outside the vocabulary "
                          f"(vocab_size={cfg.vocab_size})")
    return cfg.replace(**overrides) if overrides else cfg


def load_hf_config(path: str, family: str = "auto", **overrides) -> ModelConfig:
    """Read `path` (a config.json or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_config(raw, family, source=path, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Back to a released config.json (export)


# Keys that say which class loads a config.json (transformers' own model_type / architectures, or remote code via
# auto_map). They come from the source config when there is one: a Qwen3ForCausalLM checkpoint imported as family
# sdar must export as model_type qwen3 + Qwen3ForCausalLM again, a released SDAR one as sdar + its auto_map.
IDENTITY_KEYS = ("model_type", "architectures", "auto_map")


def to_hf_config(cfg: ModelConfig, base: Mapping[str, Any] | None = None, torch_dtype: str | None = None) -> dict:
    """A config.json in the family's own key names. `base` (the source config) keeps keys we do not model, and its
    IDENTITY_KEYS win over the family defaults, so the export loads through the same class as the source did."""
    out = dict(base or {})
    identity = {k: out[k] for k in IDENTITY_KEYS if out.get(k) is not None}
    ids = {k: getattr(cfg, k) for k in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")}
    if cfg.family == "llada":
        out.update({
            "model_type": "llada", "architectures": out.get("architectures", ["LLaDAModelLM"]),
            "d_model": cfg.hidden_size, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
            "n_layers": cfg.num_layers, "mlp_hidden_size": cfg.intermediate_size, "embedding_size": cfg.vocab_size,
            "vocab_size": min(out.get("vocab_size", cfg.vocab_size), cfg.vocab_size), "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "rope_full_precision": cfg.rope_full_precision,
            "weight_tying": cfg.tie_word_embeddings, "include_qkv_bias": cfg.qkv_bias, "include_bias": False,
            "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
            "attention_layer_norm": False, "block_group_size": 1,
            "max_sequence_length": cfg.max_position_embeddings})
    else:
        model_type = {"dream": "Dream", "sdar": "sdar"}.get(cfg.family, cfg.family)
        arch = {"dream": "DreamModel", "sdar": "SDARForCausalLM", "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]
        out.update({
            "model_type": model_type, "architectures": out.get("architectures", [arch]),
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings})
        if "rope_parameters" in out or "rope_theta" not in out:
            out["rope_parameters"] = {**(out.get("rope_parameters") or {}), "rope_type": "default",
                                      "rope_theta": cfg.rope_theta}
            out.pop("rope_theta", None)
        else:
            out["rope_theta"] = cfg.rope_theta
        if cfg.family in ("llama", "qwen3", "sdar"):
            out["attention_bias"] = False
        if cfg.family == "sdar":
            out["block_size"] = cfg.block_size
    for k, v in ids.items():  # ids already in the source config stay as written there (eos may be a list)
        if v is not None and k not in out and (k != "mask_token_id" or cfg.family in ("llada", "dream", "sdar")):
            out[k] = v
    if torch_dtype is not None:
        key = "torch_dtype" if "torch_dtype" in out else "dtype"
        out[key] = torch_dtype
    out.update(identity)
    return out
