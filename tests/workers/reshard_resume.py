"""Run with JAX_NUM_CPU_DEVICES=8: SFT saved on one mesh resumes on another (orbax reshards onto the new shardings).

straight: 6 steps on mesh (data 2, fsdp 2, tensor 2). split: 3 steps on (data 8), then resume 3 steps on (2, 2, 2).
Prints a JSON line with the max relative param difference and the per-step losses of both.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from dlmjax.data import addition
from dlmjax.data.pipeline import SFTDataConfig
from dlmjax.demo import DemoConfig, model_config
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig
from dlmjax.train.sft import SFTRunConfig, build_model, run_sft


def main():
    assert jax.device_count() == 8
    d = tempfile.mkdtemp()
    tok = addition.make_tokenizer()
    train, _ = addition.make_splits(64, 4, 2, seed=0)
    addition.write_jsonl(f"{d}/train.jsonl", train)
    dc = DemoConfig(hidden=32, layers=2, heads=2, max_digits=2, gen_length=8)
    cfg = model_config(dc, tok)

    def run(workdir, mesh, stop_at=0):
        job = LoopConfig(workdir=workdir, steps=6, log_every=1, save_every=3, stop_at=stop_at, tensorboard=False,
                         export=False)
        data = SFTDataConfig(path=f"{d}/train.jsonl", max_length=dc.max_length, global_batch_size=8, seed=1)
        run = SFTRunConfig(loop=job, data=data, objective=ObjectiveConfig(),
                           optim=OptimConfig(lr=3e-3, total_steps=6, warmup_steps=1),
                           step=StepConfig(global_batch=8, seed=2), mesh=mesh, lora=LoRAConfig())
        return run_sft(run, cfg, build_model(cfg, 0), tok, log=lambda *_: None)

    straight = run(f"{d}/a", MeshConfig(data=2, fsdp=2, tensor=2))
    first = run(f"{d}/b", MeshConfig(data=8), stop_at=3)
    second = run(f"{d}/b", MeshConfig(data=2, fsdp=2, tensor=2))
    p1 = jax.tree.leaves(straight["state"]["params"])
    p2 = jax.tree.leaves(second["state"]["params"])
    rel = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(a))) + 1e-12))
              for a, b in zip(p1, p2))
    spec = str(second["state"]["params"]["layers"]["wq"].sharding.spec)
    print(json.dumps({"rel": rel, "straight": [h["loss"] for h in straight["history"]],
                      "split": [h["loss"] for h in first["history"] + second["history"]],
                      "resumed_at": second["history"][0]["step"], "wq_spec": spec}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
