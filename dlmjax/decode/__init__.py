"""Decoders: per-block commit rules (`rules`) and token samplers / confidences (`sampling`)."""
from dlmjax.decode import rules, sampling
from dlmjax.decode.rules import (
    commit_contiguous_dynamic, commit_dream_origin, commit_dream_topk, commit_dynamic_threshold,
    commit_entropy_bounded, commit_fast_dllm_factor, commit_fast_dllm_threshold, commit_gc_dynamic,
    commit_nlc_bounded_dynamic, commit_random_top_n, commit_sequential, commit_tau_budget, commit_top_n,
    descending_rank, threshold_in,
)
from dlmjax.decode.sampling import (
    apply_temperature, clamped_entropy, filter_logits, forbid_token, greedy, gumbel_argmax_llada, margin_confidence,
    max_confidence, neg_entropy_confidence, probs, sample_categorical, sample_dream, sample_llada, sample_sdar,
    token_confidence, top_k_keep, top_p_keep,
)

__all__ = rules.__all__ + sampling.__all__ + ["rules", "sampling"]
