"""Independent references: tiny `transformers` Llama / Qwen2 / Qwen3 models with random weights, saved in each dlmjax
family's released layout, and the additive 4-D masks that make them compute LLaDA / Dream / SDAR attention.

Never imported by dlmjax. Masks here are re-stated from the spec (models_decoders.md §2.4, §3.4, §4.4), not taken
from dlmjax.model.masks.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)

# LLaDA key names (spec §2.3): Llama name -> LLaDA name.
_LLADA_NAMES = [("model.embed_tokens.weight", "model.transformer.wte.weight"),
                ("model.norm.weight", "model.transformer.ln_f.weight"),
                ("lm_head.weight", "model.transformer.ff_out.weight")]
_LLADA_LAYER = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"),
                ("self_attn.v_proj", "v_proj"), ("self_attn.o_proj", "attn_out"),
                ("post_attention_layernorm", "ff_norm"), ("mlp.gate_proj", "ff_proj"), ("mlp.up_proj", "up_proj"),
                ("mlp.down_proj", "ff_out")]


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15):
    """Weights large enough that logits are far from uniform; norm weights around 1 (not exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def build(family: str, seed: int = 0, tie: bool = False, dtype=torch.float32, **overrides):
    """(torch model, HF-style config dict in the family's released keys, state dict in released names)."""
    kw = {**TINY, "tie_word_embeddings": tie, **overrides}
    if family in ("llada", "llama"):
        cfg = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                          attn_implementation="eager")
        model = LlamaForCausalLM(cfg)
    elif family in ("dream", "qwen2"):
        cfg = Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          attn_implementation="eager", use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    elif family in ("sdar", "qwen3"):
        kw.setdefault("head_dim", 24)  # != hidden/heads on purpose (SDAR-4B has head_dim 128 != 2560/32)
        cfg = Qwen3Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          attn_implementation="eager")
        model = Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    randomize(model, seed)
    model = model.to(dtype)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    raw = json.loads(cfg.to_json_string())
    if family == "llada":
        raw = llada_config(cfg, tie)
        sd = to_llada_names(sd, cfg.num_hidden_layers)
    elif family == "dream":
        raw.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=TINY["vocab_size"] - 1)
    elif family == "sdar":
        raw.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=4,
                   mask_token_id=TINY["vocab_size"] - 1)
    return model, raw, sd


def llada_config(cfg, tie: bool) -> dict:
    """A config.json in LLaDA's own keys (as the released LLaDA-8B-Instruct config, spec §2.1)."""
    return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": cfg.hidden_size,
            "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
            "n_layers": cfg.num_hidden_layers, "mlp_hidden_size": cfg.intermediate_size, "mlp_ratio": 4,
            "embedding_size": cfg.vocab_size, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": 500000.0, "rope_full_precision": True, "rope": True, "weight_tying": tie,
            "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "include_bias": False,
            "include_qkv_bias": False, "attention_layer_norm": False, "alibi": False, "scale_logits": False,
            "input_emb_norm": False, "block_group_size": 1, "max_sequence_length": 256,
            "mask_token_id": cfg.vocab_size - 1, "eos_token_id": 1, "pad_token_id": 1, "flash_attention": False}


def to_llada_names(sd: dict, n_layers: int) -> dict:
    out = {}
    for a, b in _LLADA_NAMES:
        if a in sd:
            out[b] = sd[a]
    for i in range(n_layers):
        for a, b in _LLADA_LAYER:
            for suffix in (".weight", ".bias"):
                k = f"model.layers.{i}.{a}{suffix}"
                if k in sd:
                    out[f"model.transformer.blocks.{i}.{b}{suffix}"] = sd[k]
    assert len(out) == len(sd), (sorted(sd), sorted(out))
    return out


def write_hf_dir(path: str, raw: dict, sd: dict, shard_keys: int | None = None):
    """config.json + model.safetensors (or a sharded index with `shard_keys` tensors per file)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    keys = list(sd)
    if shard_keys is None:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    chunks = [keys[i:i + shard_keys] for i in range(0, len(keys), shard_keys)]
    wm = {}
    for j, ch in enumerate(chunks):
        fn = f"model-{j + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({k: sd[k] for k in ch}, os.path.join(path, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in ch})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


# ---- additive masks [B, 1, Lq, Lk] (0 = attend, finfo.min = blocked), the form eager attention needs ----------


def additive(allowed: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    m = torch.zeros(allowed.shape, dtype=dtype)
    m[~torch.from_numpy(np.array(allowed, bool))] = torch.finfo(dtype).min
    return m[:, None]


def llada_allowed(valid: np.ndarray) -> np.ndarray:
    """LLaDA: bidirectional; padded keys blocked, padded queries still see every valid key (§2.4)."""
    b, n = valid.shape
    return np.broadcast_to(valid[:, None, :], (b, n, n)).copy()


def dream_allowed(valid: np.ndarray) -> np.ndarray:
    """Dream: M[b,i,j] = valid_i and valid_j (§3.4)."""
    return valid[:, :, None] & valid[:, None, :]


def dream_position_ids(valid: np.ndarray) -> np.ndarray:
    """Dream's tok_idx: cumsum(mask) - 1, pad slots set to 1 (§3.4)."""
    pos = np.cumsum(valid.astype(np.int64), axis=-1) - 1
    return np.where(valid, pos, 1)


def block_causal_allowed(valid: np.ndarray, block: int) -> np.ndarray:
    """SDAR: key j visible to query i iff floor(j/b) <= floor(i/b), over absolute positions 0..L-1 (§4.4)."""
    n = valid.shape[1]
    i = np.arange(n)
    m = (i[None, :] // block) <= (i[:, None] // block)
    return m[None] & valid[:, None, :]


def causal_allowed(valid: np.ndarray) -> np.ndarray:
    n = valid.shape[1]
    return np.tril(np.ones((n, n), bool))[None] & valid[:, None, :]


def hf_logits(model, tokens: np.ndarray, allowed: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
    """Run the transformers model with a custom additive 4-D mask; f32 numpy logits."""
    dtype = next(model.parameters()).dtype
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape) if position_ids is None else position_ids
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                    attention_mask=additive(allowed, dtype), position_ids=torch.from_numpy(np.array(pos, np.int64)))
    return out.logits.float().numpy()


def scaled_lm_head(model, factor: float, row: int | None = None):
    """A copy of the torch model with its lm-head (or one row of it) scaled: sharper distributions make threshold
    rules commit several tokens per step on a random model."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        if row is None:
            m.lm_head.weight *= factor
        else:
            m.lm_head.weight[row] *= factor
    return m
