"""The TRIMS teacher pass's flags (`--job=trims_score`, an offline data job: data/trims_score.py) and their mapping
into a `TrimsScoreRunConfig`. It reads the SFT data flags of common_flags (--data, --max_length, --truncation,
--skip_malformed, --chat_template, --num_buckets), so the scored file lines up with the SFT run that reads it."""

from __future__ import annotations

from absl import app, flags

from dlmjax.launch.common_flags import F, require, require_dir, usage

flags.DEFINE_string("teacher_ckpt", None, "trims_score: converted AR teacher (Qwen3 / Llama; causal).")
flags.DEFINE_string("student_tokenizer", None, "trims_score: directory of the student's tokenizer (e.g. the student "
                                               "checkpoint).")
flags.DEFINE_enum("bucket_order", "descending", ("descending", "ascending", "random"), "trims_score: hardest tokens "
                  "in bucket 1 (descending, the paper's default) or the ablations.")
flags.DEFINE_enum("difficulty", "nll", ("nll", "entropy"), "trims_score: teacher difficulty metric.")
flags.DEFINE_integer("teacher_max_length", 4096, "trims_score: cap of the teacher's input length.", lower_bound=8)

TRIMS_SCORE_FLAGS = ("init_ckpt", "data", "max_length", "truncation", "skip_malformed", "chat_template", "out",
                     "teacher_ckpt", "student_tokenizer", "bucket_order", "difficulty", "teacher_max_length",
                     "num_buckets", "batch_size", "seed")


def trims_score_config():
    """The run's `TrimsScoreRunConfig` (the teacher / student directories are checked to exist here)."""
    from dlmjax.data.trims_score import TrimsScoreConfig, TrimsScoreRunConfig

    require(("teacher_ckpt", "data", "out"), "trims_score")
    student = F.student_tokenizer or F.init_ckpt
    if not student:
        raise app.UsageError("--job=trims_score needs --student_tokenizer (or --init_ckpt)")
    require_dir("teacher_ckpt", F.teacher_ckpt)
    require_dir("student_tokenizer" if F.student_tokenizer else "init_ckpt", student, "a tokenizer directory")
    return usage(lambda: TrimsScoreRunConfig(
        score=TrimsScoreConfig(teacher_ckpt=F.teacher_ckpt, student_tokenizer=student, K=F.num_buckets,
                               order=F.bucket_order, metric=F.difficulty, batch_size=F.batch_size,
                               max_length=F.teacher_max_length, seed=F.seed),
        data=F.data, out=F.out, max_length=F.max_length, truncation=F.truncation, chat_template=F.chat_template,
        skip_malformed=F.skip_malformed))


def run_trims_score() -> int:
    from dlmjax.data.trims_score import run_trims_score_job

    run_trims_score_job(trims_score_config())
    return 0
