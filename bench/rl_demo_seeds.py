#!/usr/bin/env python
"""The RL demo over seeds (issue 12 §5; dlmjax/rl_demo.py): the spread of each method's held-out accuracy and of its
rows to reach a level, over RL seeds on one SFT checkpoint (and over SFT seeds).

For each SFT seed `--seeds` and RL seed `--rl_seeds`, `run_rl_demo` runs in `<workdir>/sft<s>_rl<r>/` with the given
demo settings (`--steps`, `--eval_every`, `--block`, `--sft_schedule`, `--methods`). The SFT checkpoint is trained once
per SFT seed (in the first RL seed's directory) and copied into the others (the demo's reuse check accepts it only if
its settings stamp matches). `--src` (e.g. runs/rl_demo): a finished demo directory whose SFT checkpoint -- and, unless
`--fresh`, whose finished RL runs -- are copied in first, again reused only where the settings match.

Prints and writes `<workdir>/seeds.json` / `seeds.md`: per run the SFT accuracy, each method's final / best tau-budget
and final dynamic accuracy, its gain over the checkpoint, and its rows to reach `--level` (tau-budget, the first
evaluation point at or above it, so on the grid of evaluation points; "—" if never); per SFT seed (and pooled, when
there are several) and method the mean, sd, min, max and max - min over runs.

  JAX_PLATFORMS=cpu python bench/rl_demo_seeds.py --workdir=runs/rl_demo_seeds/full --src=runs/rl_demo --fresh \\
      --seeds=0,1 --rl_seeds=0,1,2,3,4 --level=0.65          # the full 40-step demo (15 min on 2 shared cores)
  JAX_PLATFORMS=cpu python bench/rl_demo_seeds.py --workdir=runs/rl_demo_seeds/ci \\
      --rl_seeds=0,1,2,3,4,5,6,7,8,9 --steps=4 --eval_every=2 --level=0.6   # the CI test's reduced run (5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ints(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: comma-separated non-negative integers expected")
    return out


def copy_in(src: str, dst: str, rl_runs: bool):
    """The SFT checkpoint (+ tokenizer, train.jsonl) and, if `rl_runs`, the finished RL histories of `src`."""
    os.makedirs(dst, exist_ok=True)
    names = ["sft", "tokenizer", "train.jsonl"]
    if rl_runs:
        names += [d for d in os.listdir(src) if d.startswith("rl_") and os.path.isdir(os.path.join(src, d))]
    for n in names:
        s, d = os.path.join(src, n), os.path.join(dst, n)
        if not os.path.exists(s) or os.path.exists(d):
            continue
        if n.startswith("rl_"):  # the history only (the demo reuses a run from it), not the RL checkpoints
            if os.path.exists(os.path.join(s, "history.json")):
                os.makedirs(d)
                shutil.copy2(os.path.join(s, "history.json"), d)
        elif os.path.isdir(s):
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("checkpoints"))
        else:
            shutil.copy2(s, d)


def rows_to(curve: list[dict], level: float):
    return next((p["rows"] for p in curve[1:] if p["acc_tau_budget"] >= level), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--src", default="", help="a finished demo directory to copy the SFT checkpoint (and RL runs) from")
    p.add_argument("--fresh", action="store_true", help="copy only the SFT checkpoint from --src, rerun every RL run")
    p.add_argument("--seeds", type=ints, default=[0], help="SFT (data, init) seeds")
    p.add_argument("--rl_seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--sft_schedule", default="constant")
    p.add_argument("--sft_steps", type=int, default=0, help="0: the calibrated count")
    p.add_argument("--methods", default="slim,tracerl,random")
    p.add_argument("--level", type=float, default=0.65, help="accuracy level for the rows-to-level column")
    a = p.parse_args(argv)

    import numpy as np

    from dlmjax.rl_demo import RLDemoConfig, run_rl_demo

    t0 = time.perf_counter()
    runs = []
    for s in a.seeds:
        first = None
        for r in a.rl_seeds:
            try:
                dc = RLDemoConfig(workdir=os.path.join(a.workdir, f"sft{s}_rl{r}"), seed=s, rl_seed=r,
                                  rl_steps=a.steps, eval_every=a.eval_every, block_size=a.block,
                                  sft_schedule=a.sft_schedule, sft_steps=a.sft_steps,
                                  methods=tuple(a.methods.split(",")))
            except ValueError as e:
                p.error(str(e))
            src = first or (os.path.join(a.src, dc.variant) if a.src and dc.variant else a.src)
            if src:
                copy_in(src, dc.out_dir, rl_runs=not a.fresh and src == a.src)
            t1 = time.perf_counter()
            res = run_rl_demo(dc, log=lambda *_: None)
            first = first or dc.out_dir
            base = res["sft"]["acc_tau_budget"]
            row = {"seed": s, "rl_seed": r, "sft_acc": base, "sft_acc_dynamic": res["sft"]["acc_dynamic"],
                   "seconds": time.perf_counter() - t1, "methods": {}}
            for x in res["rows"]:
                m = x["method"]
                row["methods"][m] = {
                    "final": x["final_acc_tau_budget"], "final_dynamic": x["final_acc_dynamic"],
                    "best": x["best_tau_budget"], "gain": x["final_acc_tau_budget"] - base,
                    "rows_per_rollout": x["rows_per_rollout"], "rows_total": x["rows_total"],
                    "rows_to_level": rows_to(res["curves"][m]["eval"], a.level),
                    "curve": [(q["rows"], q["acc_tau_budget"]) for q in res["curves"][m]["eval"]]}
            runs.append(row)
            print(f"SFT seed {s} RL seed {r}: SFT acc {base:.3f}; " + "; ".join(
                f"{m} final {v['final']:.3f} (gain {v['gain']:+.3f}) rows to {a.level} {v['rows_to_level']}"
                for m, v in row["methods"].items()) + f" ({row['seconds']:.0f} s)", flush=True)

    methods = list(runs[0]["methods"])
    lines = ["| SFT seed | RL seed | SFT acc | " + " | ".join(
        f"{m} final / gain / rows to {a.level}" for m in methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for row in runs:
        lines.append(f"| {row['seed']} | {row['rl_seed']} | {row['sft_acc']:.3f} | " + " | ".join(
            f"{v['final']:.3f} / {v['gain']:+.3f} / {v['rows_to_level'] if v['rows_to_level'] is not None else '—'}"
            for v in row["methods"].values()) + " |")
    lines += ["", "| SFT seed | method | final mean (sd) | final min – max (spread) | gain min – max | final dynamic "
              f"min – max | rows to {a.level} mean | min – max | runs reaching it |",
              "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    groups = [(str(s), [r for r in runs if r["seed"] == s]) for s in a.seeds]
    if len(a.seeds) > 1:
        groups.append(("all", runs))
    for label, grp in groups:
        for m in methods:
            fin = np.array([r["methods"][m]["final"] for r in grp])
            gain = np.array([r["methods"][m]["gain"] for r in grp])
            dyn = np.array([r["methods"][m]["final_dynamic"] for r in grp])
            reach = [r["methods"][m]["rows_to_level"] for r in grp if r["methods"][m]["rows_to_level"] is not None]
            sd = float(fin.std(ddof=1)) if len(fin) > 1 else 0.0
            summary[f"{label}/{m}"] = {"final_mean": fin.mean(), "final_sd": sd, "final_min": fin.min(),
                                       "final_max": fin.max(), "gain_min": gain.min(), "gain_max": gain.max(),
                                       "dyn_min": dyn.min(), "dyn_max": dyn.max(), "rows_to_level": reach,
                                       "reached": len(reach)}
            rr = (f"{np.mean(reach):.0f} | {min(reach):.0f} – {max(reach):.0f}" if reach else "— | —")
            lines.append(f"| {label} | {m} | {fin.mean():.3f} ({sd:.3f}) | {fin.min():.3f} – {fin.max():.3f} "
                         f"({fin.max() - fin.min():.3f}) | {gain.min():+.3f} – {gain.max():+.3f} | {dyn.min():.3f} – "
                         f"{dyn.max():.3f} | {rr} | {len(reach)}/{len(grp)} |")
    table = "\n".join(lines)
    os.makedirs(a.workdir, exist_ok=True)
    with open(os.path.join(a.workdir, "seeds.json"), "w") as f:
        json.dump({"args": vars(a), "runs": runs, "summary": summary}, f, indent=1)
    with open(os.path.join(a.workdir, "seeds.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table + f"\n\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
