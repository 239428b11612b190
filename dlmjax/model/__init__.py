"""The transformer and nothing else: no decoding policy, no losses, no I/O."""

from dlmjax.model.cache import init_cache
from dlmjax.model.masks import (block_causal_mask, causal_mask, default_mask, default_positions, dream_positions,
                                padding_mask)
from dlmjax.model.transformer import (forward, forward_jit, hidden_states, init_params, is_unstacked, lm_head,
                                      param_shapes, shift_logits, stack_layers, unstack_layers)

__all__ = ["init_cache", "block_causal_mask", "causal_mask", "default_mask", "default_positions", "dream_positions",
           "padding_mask", "forward", "forward_jit", "hidden_states", "init_params", "is_unstacked", "lm_head",
           "param_shapes", "shift_logits", "stack_layers", "unstack_layers"]
