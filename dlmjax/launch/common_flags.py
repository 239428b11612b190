"""Flags shared by more than one job family, and the helpers every flags module uses to turn flag values into
frozen configs with one-line usage errors.

A flag read by one family lives in that family's module; one read by several lives here (the decoder settings,
read by decode and eval, live in decode_flags, which eval_flags imports).
"""

from __future__ import annotations

from absl import app, flags

F = flags.FLAGS

flags.DEFINE_integer("seed", 0, "every job: PRNG seed (same seed + flags = same output).")
flags.DEFINE_integer("batch_size", 8, "decode / eval: prompts decoded together; sft / demo: sequences per optimizer "
                                     "step (global); trims_score: teacher rows per forward.", lower_bound=1)
flags.DEFINE_string("workdir", None, "demo / sft / eval: output directory (demo default runs/demo; sft: checkpoints/, "
                                     "tb/ and final/ go here; eval: one JSONL per decoder + table.md).")
flags.DEFINE_string("data", None, "sft / trims_score: JSONL of {prompt, response} or {messages} records; eval / "
                                  "rl: JSONL of {prompt, answer}, or with --scorer=code / --reward=code a code-task "
                                  "JSONL ({question, test_method, test_list | test_input + test_output, ...}; "
                                  "fields: dlmjax/rewards/code.py).")
flags.DEFINE_string("out", None, "decode / trims_score: output JSONL (written as <out>.partial, renamed when "
                                 "complete).")
flags.DEFINE_bool("chat_template", True, "decode / sft / trims_score: use the tokenizer's chat template.")
# the SFT data reader (sft, and trims_score, which must tokenise the data exactly as the SFT run will)
flags.DEFINE_string("init_ckpt", None, "sft: dlmjax checkpoint to fine-tune (python -m convert import ...); its "
                                       "tokenizer files are used for the data. trims_score: the student, whose "
                                       "tokenizer is used when --student_tokenizer is not given.")
flags.DEFINE_integer("max_length", 1024, "sft / trims_score: tokens per training row L (static; right-padded with "
                                         "trained EOS).", lower_bound=2)
flags.DEFINE_enum("truncation", "right", ("right", "filter"), "sft / trims_score: right = clip long rows (drop if the "
                  "prompt fills L); filter = drop rows longer than L (dLLM's options).")
flags.DEFINE_bool("skip_malformed", False, "sft / trims_score: skip (and count) malformed data lines instead of "
                                           "failing.")
flags.DEFINE_integer("num_buckets", 8, "sft (trims) / trims_score: difficulty buckets K.", lower_bound=2)


def usage(fn):
    """fn() with a config dataclass's ValueError turned into a usage error (its message names the field)."""
    try:
        return fn()
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def require(names, job: str):
    """Each of `names` must be given (non-empty) for --job=`job`."""
    for name in names:
        if not F[name].value:
            raise app.UsageError(f"--{name} is required for --job={job}")


def reject(names, why: str):
    """None of `names` may be given on the command line / flagfile ("--<first given> <why>")."""
    given = [n for n in names if F[n].present]
    if given:
        raise app.UsageError(f"--{given[0]} {why}")


def require_dir(flag: str, path: str, what: str = "a checkpoint directory"):
    """A path flag must name an existing directory (else a CheckpointError naming the flag and the path)."""
    import os

    from dlmjax.checkpoint import CheckpointError

    if not os.path.isdir(path):
        raise CheckpointError(f"--{flag}={path}: not {what} (no such directory)")


def require_writable_dir(flag: str, path: str):
    """A directory flag (--workdir) must name a directory this process can write, checked before the work: the
    nearest existing ancestor must be a directory that takes a small file (a read-only or full file system fails
    here, as an OutputError naming the flag). Creates nothing that outlives the check."""
    import os
    import tempfile

    from dlmjax.decode.job import OutputError

    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise OutputError(f"--{flag}={path}: {p} is not a directory")
    name = None
    try:
        fd, name = tempfile.mkstemp(prefix=".dlmjax-write-check-", dir=p)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"--{flag}={path}: cannot write in {p} ({e.strerror})") from None
    finally:
        if name is not None:
            try:
                os.remove(name)
            except OSError:
                pass
