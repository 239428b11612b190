"""ModelConfig from the released config.json of each family (values from models_decoders.md §2.1, §3.1, §4.1)."""

import json

import pytest

from dlmjax.config import ConfigError, ModelConfig, from_hf_config, load_hf_config, to_hf_config

LLADA_8B = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 4096, "n_layers": 32, "n_heads": 32,
            "n_kv_heads": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "activation_type": "silu",
            "block_type": "llama", "vocab_size": 126464, "embedding_size": 126464, "rope": True,
            "rope_theta": 500000.0, "rope_full_precision": True, "max_sequence_length": 4096,
            "layer_norm_type": "rms", "rms_norm_eps": 1e-05, "attention_layer_norm": False, "include_bias": False,
            "include_qkv_bias": False, "weight_tying": False, "scale_logits": False, "input_emb_norm": False,
            "alibi": False, "flash_attention": True, "mask_token_id": 126336, "eos_token_id": 126081,
            "pad_token_id": 126081, "use_cache": False, "block_group_size": 1}
DREAM_7B = {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 3584, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
            "hidden_act": "silu", "use_sliding_window": False, "mask_token_id": 151666, "pad_token_id": 151643,
            "bos_token_id": 151643, "eos_token_id": 151643, "max_position_embeddings": 131072}
SDAR_4B = {"model_type": "sdar", "architectures": ["SDARForCausalLM"], "hidden_size": 2560, "num_hidden_layers": 36,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728,
           "vocab_size": 151936, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
           "rope_scaling": None, "attention_bias": False, "hidden_act": "silu", "max_position_embeddings": 32768,
           "use_sliding_window": False, "block_size": 4, "mask_token_id": 151669, "bos_token_id": 151643,
           "eos_token_id": 151643}


def test_llada_8b():
    c = from_hf_config(LLADA_8B)
    assert (c.family, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llada", 4096, 32, 32, 32, 128)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.rope_full_precision) == (12288, 126464, 5e5, True)
    assert (c.attention, c.tie_word_embeddings, c.qkv_bias, c.qk_norm) == ("bidirectional", False, False, False)
    assert (c.mask_token_id, c.eos_token_id, c.pad_token_id) == (126336, 126081, 126081)


def test_llada_mlp_ratio_and_kv_default():
    raw = {**LLADA_8B, "mlp_hidden_size": None, "n_kv_heads": None, "d_model": 64, "n_heads": 4}
    c = from_hf_config(raw)
    assert c.intermediate_size == 4 * 64 and c.num_kv_heads == 4 and c.head_dim == 16


def test_dream_7b():
    c = from_hf_config(DREAM_7B)
    assert (c.family, c.head_dim, c.num_kv_heads, c.qkv_bias, c.qk_norm, c.attention, c.logit_shift) == \
        ("dream", 128, 4, True, False, "bidirectional", True)
    assert c.mask_token_id == 151666 and c.rms_norm_eps == 1e-6


def test_sdar_4b_head_dim_trap():
    c = from_hf_config(SDAR_4B)
    assert c.head_dim == 128 and c.hidden_size // c.num_heads == 80  # explicit head_dim wins
    assert (c.qk_norm, c.attention, c.block_size, c.mask_token_id) == (True, "block_causal", 4, 151669)


def test_rope_parameters_v5_form_and_eos_list():
    raw = {**{k: v for k, v in SDAR_4B.items() if k != "rope_theta"},
           "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "model_type": "qwen3",
           "eos_token_id": [151645, 151643]}
    c = from_hf_config(raw)
    assert c.family == "qwen3" and c.rope_theta == 5e5 and c.attention == "causal" and c.eos_token_id == 151645


@pytest.mark.parametrize("raw,match", [
    ({**DREAM_7B, "rope_scaling": {"rope_type": "yarn", "factor": 4}}, r"rope_scaling=.*not supported"),
    ({**SDAR_4B, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1}}, r"rope_parameters\.rope_type"),
    ({**DREAM_7B, "hidden_act": "gelu"}, r"field 'hidden_act'='gelu'"),
    ({**DREAM_7B, "use_sliding_window": True}, r"use_sliding_window"),
    ({**DREAM_7B, "num_key_value_heads": 5}, r"num_kv_heads: 5 does not divide num_heads=28"),
    ({**LLADA_8B, "block_type": "sequential"}, r"field 'block_type'='sequential' is not supported"),
    ({**LLADA_8B, "attention_layer_norm": True}, r"attention_layer_norm"),
    ({**LLADA_8B, "d_model": 4097}, r"d_model=4097 is not divisible by n_heads=32"),
    ({**LLADA_8B, "mask_token_id": 200000}, r"mask_token_id=200000 is outside the vocabulary"),
    ({k: v for k, v in DREAM_7B.items() if k != "intermediate_size"}, r"required field 'intermediate_size'"),
    ({**SDAR_4B, "num_hidden_layers": 36.0}, r"'num_hidden_layers' must be an integer"),
    ({**SDAR_4B, "attention_bias": True}, r"attention_bias"),
])
def test_bad_configs_name_the_field_and_file(raw, match, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=match) as e:
        load_hf_config(str(tmp_path))
    assert str(p) in str(e.value) or "ModelConfig." in str(e.value)


def test_unknown_family_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot tell the model family"):
        from_hf_config({"model_type": "gpt2"}, source="x/config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_hf_config(str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown family 'bert'"):
        from_hf_config(DREAM_7B, family="bert")


@pytest.mark.parametrize("raw", [LLADA_8B, DREAM_7B, SDAR_4B])
def test_to_hf_config_round_trip(raw):
    c = from_hf_config(raw)
    assert from_hf_config(to_hf_config(c)) == c  # generated from scratch
    assert from_hf_config(to_hf_config(c, raw)) == c  # on top of the source: keys we do not model are kept
    assert to_hf_config(c, raw)["model_type"] == raw["model_type"]


def test_numerics_fields_validated():
    c = from_hf_config(DREAM_7B, compute_dtype="bfloat16", remat="dots")
    assert c.compute_dtype == "bfloat16" and c.param_dtype == "float32" and c.remat == "dots"
    with pytest.raises(ConfigError, match=r"remat"):
        c.replace(remat="sometimes")
    with pytest.raises(ConfigError, match=r"compute_dtype"):
        ModelConfig(**{**c.to_dict(), "compute_dtype": "int8"})
