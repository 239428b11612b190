"""One bidirectional name/transform table per family: HF tensor name <-> dlmjax param path.

Import reads the table forwards (`to_ours`), export backwards (`to_hf`); nothing else knows the names.
PyTorch Linear weights are [out, in]; ours are [in, out] with heads split out: wq [D, H, Dh], wo [H, Dh, D].
RoPE is half-split in every family, so no q/k permutation is needed (spec §1.2).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dlmjax.config import ModelConfig, param_shapes


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: str  # flat dlmjax name, e.g. "layers.wq"
    hf: str  # HF key; "{i}" marks the layer index for per-layer tensors
    kind: str  # identity | linear | in_heads | out_heads | bias_heads
    heads: int = 0  # number of heads for *_heads kinds

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


_LLADA = [  # LLaDA's OLMo-derived names (spec §2.3); note blocks.{i}.ff_out (down proj) vs transformer.ff_out (head)
    ("embed", "model.transformer.wte.weight", "identity"),
    ("layers.attn_norm", "model.transformer.blocks.{i}.attn_norm.weight", "identity"),
    ("layers.wq", "model.transformer.blocks.{i}.q_proj.weight", "in_heads:q"),
    ("layers.wk", "model.transformer.blocks.{i}.k_proj.weight", "in_heads:kv"),
    ("layers.wv", "model.transformer.blocks.{i}.v_proj.weight", "in_heads:kv"),
    ("layers.bq", "model.transformer.blocks.{i}.q_proj.bias", "bias_heads:q"),
    ("layers.bk", "model.transformer.blocks.{i}.k_proj.bias", "bias_heads:kv"),
    ("layers.bv", "model.transformer.blocks.{i}.v_proj.bias", "bias_heads:kv"),
    ("layers.wo", "model.transformer.blocks.{i}.attn_out.weight", "out_heads:q"),
    ("layers.mlp_norm", "model.transformer.blocks.{i}.ff_norm.weight", "identity"),
    ("layers.w_gate", "model.transformer.blocks.{i}.ff_proj.weight", "linear"),
    ("layers.w_up", "model.transformer.blocks.{i}.up_proj.weight", "linear"),
    ("layers.w_down", "model.transformer.blocks.{i}.ff_out.weight", "linear"),
    ("final_norm", "model.transformer.ln_f.weight", "identity"),
    ("lm_head", "model.transformer.ff_out.weight", "identity"),
]

_HF = [  # Llama / Qwen2 / Qwen3 names, also used by Dream (§3.3) and SDAR/TraDo (§4.3)
    ("embed", "model.embed_tokens.weight", "identity"),
    ("layers.attn_norm", "model.layers.{i}.input_layernorm.weight", "identity"),
    ("layers.wq", "model.layers.{i}.self_attn.q_proj.weight", "in_heads:q"),
    ("layers.wk", "model.layers.{i}.self_attn.k_proj.weight", "in_heads:kv"),
    ("layers.wv", "model.layers.{i}.self_attn.v_proj.weight", "in_heads:kv"),
    ("layers.bq", "model.layers.{i}.self_attn.q_proj.bias", "bias_heads:q"),
    ("layers.bk", "model.layers.{i}.self_attn.k_proj.bias", "bias_heads:kv"),
    ("layers.bv", "model.layers.{i}.self_attn.v_proj.bias", "bias_heads:kv"),
    ("layers.q_norm", "model.layers.{i}.self_attn.q_norm.weight", "identity"),
    ("layers.k_norm", "model.layers.{i}.self_attn.k_norm.weight", "identity"),
    ("layers.wo", "model.layers.{i}.self_attn.o_proj.weight", "out_heads:q"),
    ("layers.mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "identity"),
    ("layers.w_gate", "model.layers.{i}.mlp.gate_proj.weight", "linear"),
    ("layers.w_up", "model.layers.{i}.mlp.up_proj.weight", "linear"),
    ("layers.w_down", "model.layers.{i}.mlp.down_proj.weight", "linear"),
    ("final_norm", "model.norm.weight", "identity"),
    ("lm_head", "lm_head.weight", "identity"),
]

# HF keys that carry no parameters (non-persistent buffers saved by old transformers versions).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def table(cfg: ModelConfig) -> list[Entry]:
    """The entries present for this config (biases / q-k norms / lm head only where the config has them)."""
    shapes = param_shapes(cfg)
    present = set(flatten_names(shapes))
    out = []
    for ours, hf, kind in (_LLADA if cfg.family == "llada" else _HF):
        if ours not in present:
            continue
        base, _, which = kind.partition(":")
        heads = {"q": cfg.num_heads, "kv": cfg.num_kv_heads}.get(which, 0)
        out.append(Entry(ours, hf, base, heads))
    return out


def tied_head_key(cfg: ModelConfig) -> str:
    """The HF lm-head key, which tied checkpoints usually omit."""
    return "model.transformer.ff_out.weight" if cfg.family == "llada" else "lm_head.weight"


def flatten_names(tree, prefix="") -> dict:
    """{"layers.wq": leaf, ...} for a nested dict."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_names(v, name + "."))
        else:
            out[name] = v
    return out


def unflatten_names(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def hf_shape(e: Entry, ours_shape: tuple) -> tuple:
    """HF shape of one (per-layer slice of an) entry, given our (per-layer) shape."""
    if e.kind == "linear":
        return (ours_shape[1], ours_shape[0])
    if e.kind == "in_heads":  # ours [D, H, Dh] <- HF [H*Dh, D]
        return (ours_shape[1] * ours_shape[2], ours_shape[0])
    if e.kind == "out_heads":  # ours [H, Dh, D] <- HF [D, H*Dh]
        return (ours_shape[2], ours_shape[0] * ours_shape[1])
    if e.kind == "bias_heads":
        return (ours_shape[0] * ours_shape[1],)
    return tuple(ours_shape)


def to_ours(e: Entry, x: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout (one layer)."""
    if e.kind == "linear":
        return x.T
    if e.kind == "in_heads":
        return x.T.reshape(x.shape[1], e.heads, x.shape[0] // e.heads)
    if e.kind == "out_heads":
        return x.T.reshape(e.heads, x.shape[1] // e.heads, x.shape[0])
    if e.kind == "bias_heads":
        return x.reshape(e.heads, x.shape[0] // e.heads)
    return x


def to_hf(e: Entry, x: np.ndarray) -> np.ndarray:
    """Our layout (one layer) -> HF tensor; exact inverse of `to_ours`."""
    if e.kind == "linear":
        return x.T
    if e.kind == "in_heads":
        return x.reshape(x.shape[0], -1).T
    if e.kind == "out_heads":
        return x.reshape(-1, x.shape[2]).T
    if e.kind == "bias_heads":
        return x.reshape(-1)
    return x
