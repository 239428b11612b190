"""`python -m dlmjax.launch --job=... [--flagfile=...]`: every dlmjax job behind absl flags.

  registry.py      the job registry (--job name -> flags module -> runner), the per-job flag check, main
  common_flags.py  flags shared by several job families (seed, batch_size, workdir, data, ...) + helpers
  decode_flags.py  --job=decode (and the decoder settings eval reads)
  train_flags.py   --job=sft, --job=demo
  eval_flags.py    --job=eval
  trims_flags.py   --job=trims_score
  parity_flags.py  --job=parity
Importing the package defines every flag (so `--helpfull` documents them all); nothing below dlmjax.launch imports
it. See docs/launcher_notes.md.
"""

import os

# transformers warns "model of type llada to instantiate a model of type ``" whenever AutoTokenizer reads a dlmjax
# checkpoint's config.json; the message is noise for every job here (errors still show).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dlmjax.launch.registry import JOBS, Job, check_job_flags, main, usage_doc  # noqa: E402,F401
