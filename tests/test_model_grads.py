"""Our parameter gradients vs torch autograd through `transformers` Llama / Qwen2 / Qwen3 with the same weights.

The attention core and the SwiGLU MLP have hand-written VJPs (`model/layers.py`); this checks every parameter's
gradient of a fixed random linear functional of the logits against the independent reference, with the family's
mask (bidirectional with padded keys, Dream's padding mask and positions, SDAR's block-causal mask, causal)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax import model as M
from dlmjax.checkpoint import load_checkpoint, naming
from tests.reference import hf_models as R
from tests.test_model_parity import _batch, _rows

ALLOWED = {"llada": lambda v: (R.llada_allowed(v), None), "dream": lambda v: (R.dream_allowed(v),
                                                                                R.dream_position_ids(v)),
           "sdar": lambda v: (R.block_causal_allowed(v, 4), None), "qwen3": lambda v: (R.causal_allowed(v), None)}
HF_NAMES = {ours: hf for ours, hf, _ in naming._HF}  # the torch reference is always a Llama / Qwen class


@pytest.mark.parametrize("family", list(ALLOWED))
def test_param_grads_match_torch_autograd(family, imported):
    model, ckpt, raw, _ = imported(family)
    vocab = raw.get("vocab_size") or raw["embedding_size"]
    tokens, valid = _batch(vocab, seed=5)
    rows = _rows(family, valid)
    cot = np.random.default_rng(6).normal(size=tokens.shape + (vocab,)).astype(np.float32) * rows[..., None]

    cfg, params = load_checkpoint(ckpt)
    t, v = jnp.asarray(tokens, jnp.int32), jnp.asarray(valid)
    pos = M.default_positions(cfg, v)
    mask = M.default_mask(cfg, v, pos)
    ours = jax.jit(jax.grad(lambda p: jnp.sum(M.forward(cfg, p, t, pos, mask) * cot)))(params)
    flat = naming.flatten_names(jax.tree.map(np.asarray, ours))

    allowed, position_ids = ALLOWED[family](valid)
    pos_t = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape) if position_ids is None else position_ids
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), attention_mask=R.additive(allowed),
                   position_ids=torch.from_numpy(np.array(pos_t, np.int64))).logits
    (logits * torch.from_numpy(cot)).sum().backward()
    ref = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    checked = 0
    for e in naming.table(cfg):
        g = flat[e.ours]
        for i in range(cfg.num_layers) if e.per_layer else [None]:
            key = HF_NAMES[e.ours].format(i=i)
            want = ref[key]
            got = naming.to_hf(e, g[i] if i is not None else g)
            scale = np.abs(want).max()
            assert scale > 0, key
            err = np.abs(got - want).max()
            assert err <= 2e-4 * scale, f"{family} {key}: max abs diff {err:.3g} vs grad scale {scale:.3g}"
            checked += 1
    assert checked >= 2 + 9 * cfg.num_layers
