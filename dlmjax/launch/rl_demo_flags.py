"""The RL demo's flags (`--job=rl_demo`: dlmjax/rl_demo.py, issue 12 §5) and their mapping into an `RLDemoConfig`.

Every demo-only flag is prefixed `rl_demo_` so it never collides with the rl job's own flags; the shared ones are
--workdir (default runs/rl_demo) and --seed. Defaults are RLDemoConfig's (the calibrated CPU demo)."""

from __future__ import annotations

from absl import flags

from dlmjax.launch.common_flags import F, usage

flags.DEFINE_list("rl_demo_methods", ["slim", "tracerl", "random"], "rl_demo: RL methods to run from the one SFT "
                  "checkpoint (slim | tracerl | random | coupled).")
flags.DEFINE_integer("rl_demo_sft_steps", None, "rl_demo: block-diffusion SFT steps (default: the count calibrated "
                     "for --rl_demo_block and --rl_demo_sft_schedule, rl_demo.CALIBRATED_SFT_STEPS).", lower_bound=1)
flags.DEFINE_integer("rl_demo_block", None, "rl_demo: block size K = S of the model, the SFT, the rollouts and the RL "
                     "rows (default 4; 12 = the whole response is one block). Must divide 12; a K other than 4 runs "
                     "in <workdir>/k<K>, with its own SFT checkpoint.", lower_bound=1)
flags.DEFINE_enum("rl_demo_sft_schedule", None, ("constant", "cosine", "linear"), "rl_demo: SFT learning rate after "
                  "warmup (default constant; cosine / linear decay to 0 at the last SFT step). A decaying schedule "
                  "runs in <workdir>/[k<K>_]sft_<schedule>, with its own SFT checkpoint.")
flags.DEFINE_integer("rl_demo_steps", None, "rl_demo: RL outer steps per method (default RLDemoConfig.rl_steps).",
                     lower_bound=1)
flags.DEFINE_integer("rl_demo_prompts", None, "rl_demo: prompts per outer step.", lower_bound=1)
flags.DEFINE_integer("rl_demo_group", None, "rl_demo: rollouts per prompt (G).", lower_bound=1)
flags.DEFINE_float("rl_demo_lr", None, "rl_demo: RL learning rate (constant).")
flags.DEFINE_integer("rl_demo_minibatch", None, "rl_demo: training rows per optimizer step.", lower_bound=1)
flags.DEFINE_enum("rl_demo_filter", None, ("math", "none"), "rl_demo: group filter (math: 0.2 <= mean <= 0.8).")
flags.DEFINE_integer("rl_demo_eval_every", None, "rl_demo: outer steps between held-out evaluations (must divide "
                     "--rl_demo_steps).", lower_bound=1)
flags.DEFINE_integer("rl_demo_n_test", None, "rl_demo: held-out problems.", lower_bound=1)
flags.DEFINE_integer("rl_demo_eval_k", None, "rl_demo: samples per held-out problem (avg@k).", lower_bound=1)
flags.DEFINE_integer("rl_demo_rl_seed", None, "rl_demo: seed of the RL runs only (default: --seed; the data, init "
                     "and SFT always use --seed).", lower_bound=0)
flags.DEFINE_enum("rl_demo_random_rule", None, ("tau_budget", "dynamic"), "rl_demo: rollout decoder of random "
                  "masking.")

_MAP = {"rl_demo_sft_steps": "sft_steps", "rl_demo_steps": "rl_steps", "rl_demo_prompts": "prompts_per_step",
        "rl_demo_group": "group_size", "rl_demo_lr": "rl_lr", "rl_demo_minibatch": "minibatch",
        "rl_demo_filter": "group_filter", "rl_demo_eval_every": "eval_every", "rl_demo_n_test": "n_test",
        "rl_demo_eval_k": "eval_k", "rl_demo_random_rule": "random_rule", "rl_demo_rl_seed": "rl_seed",
        "rl_demo_block": "block_size", "rl_demo_sft_schedule": "sft_schedule"}
RL_DEMO_FLAGS = ("workdir", "seed", "rl_demo_methods", *_MAP)


def rl_demo_config():
    from dlmjax.rl_demo import RLDemoConfig

    kw = {"workdir": F.workdir or "runs/rl_demo", "seed": F.seed, "methods": tuple(F.rl_demo_methods)}
    kw.update({field: F[name].value for name, field in _MAP.items() if F[name].value is not None})
    return usage(lambda: RLDemoConfig(**kw))


def run_rl_demo() -> int:
    from dlmjax.rl_demo import run_rl_demo as demo

    res = demo(rl_demo_config())
    return 0 if all(r["final_acc_tau_budget"] > res["sft"]["acc_tau_budget"] for r in res["rows"]) else 1
