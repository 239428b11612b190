#!/usr/bin/env python
"""Calibrate the RL demo's block-diffusion SFT step count (issue 12 §5; dlmjax/rl_demo.py): held-out accuracy of SFT
checkpoints, so that the demo's checkpoint leaves room for RL (tau-budget accuracy in 0.3-0.6 at T = 1).

The SFT run is exactly the demo's (`dlmjax.rl_demo.sft_run_config`: same data, init, batch, LR, warmup, objective,
block size K = `--block`), and each checkpoint is scored by the demo's own held-out evaluation (`make_eval`: avg@4 on
the 256 held-out problems, tau-budget and dynamic decoders, fixed keys), so a number here is the number the demo
prints for a checkpoint of that many steps.

  constant LR (`--schedule constant`): a shorter run is exactly a prefix of a longer one (the schedule after warmup
      does not depend on the total), so ONE run of max(`--steps`) steps saving every `--every` steps gives every
      step count: each saved checkpoint is evaluated.
  decaying LR (`--schedule cosine | linear`, to 0 at the last step): the schedule depends on the total, so each
      value of `--steps` is its own run; its final checkpoint is evaluated.

Writes `<workdir>/calibration.json` ({steps: {acc_tau_budget, acc_dynamic, tpf_*, ewc_step_*}}) and prints a
table. Examples (docs/rl_demo_notes.md has the results):

  JAX_PLATFORMS=cpu python bench/rl_demo_calibrate.py --block=12 --steps=2000 --every=100 \\
      --workdir=runs/rl_demo_calib/k12
  JAX_PLATFORMS=cpu python bench/rl_demo_calibrate.py --block=4 --schedule=cosine --steps=500,600,700 \\
      --workdir=runs/rl_demo_calib/k4_cosine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=int, default=4, help="block size K of the model, the SFT and the decoders")
    p.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="constant")
    p.add_argument("--steps", default="2000", help="constant: the longest run; decaying: comma-separated totals")
    p.add_argument("--every", type=int, default=100, help="constant only: steps between evaluated checkpoints")
    a = p.parse_args(argv)
    try:
        totals = sorted({int(x) for x in a.steps.split(",") if x.strip()})
        if not totals or min(totals) <= 0 or a.every <= 0:
            raise ValueError
    except ValueError:
        p.error(f"--steps={a.steps!r} / --every={a.every}: positive integers expected")
    if a.schedule == "constant" and len(totals) > 1:
        p.error("--schedule=constant takes one --steps value (the longest run; every --every steps is evaluated)")

    import orbax.checkpoint as ocp

    from dlmjax.data import addition
    from dlmjax.rl_demo import RLDemoConfig, make_data, make_eval, sft

    os.makedirs(a.workdir, exist_ok=True)
    tok = addition.make_tokenizer()
    out, path = {}, os.path.join(a.workdir, "calibration.json")
    t0 = time.perf_counter()
    for n in totals:
        dc = RLDemoConfig(workdir=os.path.join(a.workdir, f"n{n}"), seed=a.seed, block_size=a.block,
                          sft_steps=n, sft_schedule=a.schedule)
        train, test = make_data(dc)
        every = a.every if a.schedule == "constant" else n
        cfg, params, secs = sft(dc, tok, train, log=lambda *_: None, save_every=every, keep=n // every + 1)
        eval_fn = make_eval(dc, cfg, tok, test)
        if a.schedule == "constant":
            ck = os.path.join(dc.out_dir, "sft", "checkpoints")
            steps = sorted(int(d) for d in os.listdir(ck) if d.isdigit())
            for s in steps:
                st = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(ck, str(s), "state")))
                out[s] = eval_fn(s, st["params"])
                print(f"K={a.block} {a.schedule} step {s}: " + json.dumps({k: round(v, 3) for k, v in out[s].items()}),
                      flush=True)
        else:
            out[n] = eval_fn(n, params)
            print(f"K={a.block} {a.schedule} {n} steps: " + json.dumps({k: round(v, 3) for k, v in out[n].items()}),
                  flush=True)
        print(f"  (SFT {secs:.0f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
    with open(path, "w") as f:
        json.dump({"block": a.block, "schedule": a.schedule, "seed": a.seed, "seconds": time.perf_counter() - t0,
                   "points": {str(k): v for k, v in sorted(out.items())}}, f, indent=1)
    print("\n| SFT steps | acc tau-budget | acc dynamic |\n|---|---|---|")
    for k, v in sorted(out.items()):
        print(f"| {k} | {v['acc_tau_budget']:.3f} | {v['acc_dynamic']:.3f} |")
    print(f"{path}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
