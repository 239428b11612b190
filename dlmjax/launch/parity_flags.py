"""The parity job's flags (`--job=parity`): convert the real SmolLM2-135M checkpoint and print the parity report
(dlmjax/real_weights.py)."""

from __future__ import annotations

from absl import flags

from dlmjax.launch.common_flags import F

flags.DEFINE_string("cache_dir", None, "parity: directory for converted real checkpoints (default $DLMJAX_CACHE or "
                                       "~/.cache/dlmjax).")
flags.DEFINE_multi_string("prompt", None, "parity: a chat prompt (repeatable); default: four built-in prompts.")
flags.DEFINE_integer("new_tokens", 32, "parity: length of the greedy continuation compared token by token.",
                     lower_bound=1)

PARITY_FLAGS = ("cache_dir", "prompt", "new_tokens")


def run_parity() -> int:
    from dlmjax.real_weights import DEFAULT_PROMPTS, format_report, parity_report

    rep = parity_report(F.prompt or DEFAULT_PROMPTS, F.new_tokens, F.cache_dir)
    print(format_report(rep))
    return 0 if all(r["greedy_identical"] and r["argmax_agree"] == 1.0 for r in rep["rows"]) else 1
