"""The eval job's flags (`--job=eval`) and their mapping into an `EvalJobConfig` (evaluate.py). The decoder settings
are decode_flags' (imported here, so eval and decode parse them the same way); --rules gives one table row each."""

from __future__ import annotations

from absl import flags

from dlmjax.launch import decode_flags
from dlmjax.launch.common_flags import F, require, usage
from dlmjax.rewards.registry import SCORERS

flags.DEFINE_enum("scorer", "exact", SCORERS, "eval: how a completion is checked "
                  "against the answer (math: math-verify on the whole completion; boxed: the RL math reward, the "
                  "last \\boxed{} vs the answer).")
flags.DEFINE_list("rules", None, "eval: comma list of commit rules of --decoder, one table row each "
                                 "(default: --rule).")

EVAL_FLAGS = ("ckpt", "data", "workdir", "scorer", "rules", "batch_size", "seed", "dtype") + \
    decode_flags.DECODER_FLAGS


def eval_config():
    import dataclasses

    from dlmjax.evaluate import EvalJobConfig, EvalRun

    require(("ckpt", "data", "workdir"), "eval")
    _, dc = decode_flags.decode_configs(check_io=False)
    rules = F.rules or [dc.rule if hasattr(dc, "rule") else "default"]
    runs = tuple(EvalRun(f"{F.decoder}:{r}", F.decoder, usage(lambda: dataclasses.replace(dc, rule=r)))
                 for r in rules)
    return usage(lambda: EvalJobConfig(ckpt=F.ckpt, data=F.data, workdir=F.workdir, runs=runs, scorer=F.scorer,
                                       batch_size=F.batch_size, seed=F.seed, dtype=F.dtype,
                                       layer_loop=F.layer_loop))


def run_eval() -> int:
    from dlmjax.evaluate import run_eval_job

    run_eval_job(eval_config())
    return 0
