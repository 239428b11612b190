"""LoRA as a small pytree of our own: W_eff = W + (alpha / r) * A @ B on the stacked linear layers, base frozen.

Why not qwix: qwix intercepts flax module calls (nnx / linen `Dense`/`Einsum`), while our model is pure functions
over a params dict with stacked [NL, ...] weights; a 60-line pytree transform fits that design and keeps the base
untouched. The merge is differentiable (gradients reach only A, B) and `merge` is also how an adapter is folded
into an exportable checkpoint. Dropout on the adapter input is not expressible in merged form and is not offered.

lora = {name: {"a": [NL, *in_dims, r], "b": [NL, r, *out_dims]}} for name in LoRAConfig.targets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dlmjax.train.config import LoRAConfig

# number of input dims after the leading NL dim (wo [NL, H, Dh, D] reads two)
_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def init_lora(lc: LoRAConfig, layers: dict, key) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0: the merge starts at W."""
    out = {}
    keys = jax.random.split(key, len(lc.targets))
    for name, k in zip(lc.targets, keys):
        w = layers[name]
        nl, n_in = w.shape[0], _IN_DIMS[name]
        in_dims, out_dims = w.shape[1:1 + n_in], w.shape[1 + n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_dims))
        out[name] = {"a": jax.random.uniform(k, (nl, *in_dims, lc.rank), jnp.float32, -bound, bound),
                     "b": jnp.zeros((nl, lc.rank, *out_dims), jnp.float32)}
    return out


def delta(lc: LoRAConfig, name: str, ab: dict, shape) -> jax.Array:
    """(alpha / r) * A @ B reshaped to the weight's shape [NL, ...] (f32)."""
    a, b = ab["a"], ab["b"]
    nl, r = a.shape[0], a.shape[-1]
    d = jnp.einsum("nir,nro->nio", a.reshape(nl, -1, r), b.reshape(nl, r, -1))
    return (lc.alpha / lc.rank) * d.reshape(shape)


def merge(lc: LoRAConfig, params: dict, lora: dict) -> dict:
    """Params with every adapter folded in (same dtypes as the base)."""
    layers = dict(params["layers"])
    for name, ab in lora.items():
        w = layers[name]
        layers[name] = (w.astype(jnp.float32) + delta(lc, name, ab, w.shape)).astype(w.dtype)
    return {**params, "layers": layers}
