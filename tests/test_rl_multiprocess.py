"""The RL job multi-host on one CPU box: 2 JAX processes on localhost (gloo CPU collectives, one CPU device each) run
the real launcher (`--job=rl --distributed --coordinator=...`) on a tiny SDAR model: save at outer step 2 and leave,
resume to step 4 and export `final/`. A 1-process straight run must give the same per-step metrics (reward, rows,
loss, KL, ...) and the same exported params: every process draws the same prompt stream, feeds its block of the
step's rollouts and of each minibatch, scores its own share of the rollouts, and the rewards are all-gathered, so
nothing depends on the process count. A copy of the 2-process checkpoint resumed by ONE process (another process
count) continues the same run. Plus dry runs of the TPU-pod / SLURM scripts with an RL recipe and the
--distributed usage errors.

The reward: a random tiny model earns 0 under the registry's scorers (all advantages 0, the policy never moves and
the comparison would be vacuous), so the children run the launcher with the `exact` scorer swapped for one that
varies between the rollouts of a prompt (the answer's last digit appears in the completion; ~40% of random
completions). Everything else is the launcher's own path.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlmjax.checkpoint import save_checkpoint
from dlmjax.config import ModelConfig
from dlmjax.data import addition
from dlmjax.model.transformer import init_params
from dlmjax.rl.job import PromptStream
from tests.launcher import ROOT, Procs, assert_params_close, child_env, mp_argvs, script, tb_scalars

STEPS = 4

# The launcher's __main__, with the `exact` scorer replaced (see the module docstring).
_CHILD = "\n".join([
    "from dlmjax.rewards import registry",
    "registry.get_scorer = lambda name: (lambda text, answer: answer.strip()[-1:] in text)",
    "from absl import app",
    "from dlmjax.launch.__main__ import main_or_exit, parse_flags",
    "app.run(main_or_exit, flags_parser=parse_flags)",
])


def RLProcs(tmp, name, argvs, cache_dir=None):
    """Launcher processes running through _CHILD."""
    return Procs(tmp, name, argvs, cache_dir, program=("-c", _CHILD))


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    """A tiny SDAR checkpoint (block-causal, qk-norm, K = 4) with the demo's character tokenizer, 8 addition-style
    prompts as a math JSONL, and the flagfile every run shares (workdir given per run)."""
    d = tmp_path_factory.mktemp("rlmp")
    tok = addition.make_tokenizer()
    tok.save_pretrained(str(d / "tok"))
    cfg = ModelConfig(family="sdar", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=1e4, qk_norm=True,
                      attention="block_causal", block_size=4, mask_token_id=tok.mask_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=64)
    save_checkpoint(cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))), str(d / "init"),
                    tokenizer_dir=str(d / "tok"))
    train, _ = addition.make_splits(8, 1, 2, seed=0)
    # Prompts of 5 and 7 tokens, placed so that each outer step draws one of each (the job's seeded stream, --seed=1):
    # process 0's block (G copies of the step's first prompt) is 5 wide and process 1's 7 wide, so the common width
    # is needed, while the step's width (and so every compiled shape) stays 7.
    order = PromptStream(len(train), 2, 1)
    steps = [next(order) for _ in range(STEPS)]
    long = {int(b) for _, b in steps}
    assert all(int(a) not in long for a, _ in steps) and len(long) == STEPS
    with open(d / "math.jsonl", "w") as f:
        for i, r in enumerate(train):
            f.write(json.dumps({"prompt": r["prompt"] + ("+1" if i in long else ""), "answer": r["answer"]}) + "\n")
    flagfile = d / "rl.flags"
    # 2 prompts x G 4 = 8 rollouts per step (4 per process), minibatches of 4 rows (2 per process); SLIM rows
    # (3 per rollout) give several minibatches, so the later updates are off-policy; LoRA puts the merge (combine)
    # in front of the rollouts.
    flagfile.write_text("\n".join([
        "--job=rl", f"--init_ckpt={d / 'init'}", f"--data={d / 'math.jsonl'}", f"--outer_steps={STEPS}",
        "--prompt_template=none", "--block_size=4", "--max_new_tokens=8", "--prompts_per_step=2",
        "--group_size=4", "--batch_size=4", "--group_filter=none", "--reward=exact", "--reward_workers=0",
        "--lr=1e-2", "--adam_eps=1e-3", "--lora_rank=4", "--lora_alpha=8", "--log_every=1", "--save_every=2",
        "--keep=3", "--seed=1"]) + "\n")
    return d, flagfile, d / "jax_cache"


def _logged(stdout):
    """{step: {metric: printed value}} from the loop's log lines (`step s/N loss x name v ... grad_norm g ...`)."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^step (\d+)/\d+ loss (\S+) (.*) grad_norm (\S+) lr", line)
        if m:
            kv = m.group(3).split()
            out[int(m.group(1))] = {"loss": m.group(2), "grad_norm": m.group(4), **dict(zip(kv[::2], kv[1::2]))}
    return out


# the printed metrics that must agree: what the rollouts, rewards and rows give exactly; what the device computes
# from them (losses, ratios: 2 devices reduce in another order than 1) to one unit of the last printed digit
EXACT = ("reward", "accuracy", "groups_kept", "rows", "rows_total", "rollouts_total", "updates", "tpf",
         "response_len")
CLOSE = ("loss", "kl", "ratio", "clip_frac", "grad_norm", "ewc_per_step", "mask_ratio")


def _assert_same_metrics(got, ref, steps):
    assert sorted(got) == sorted(ref) == list(steps), (sorted(got), sorted(ref))
    for s in steps:
        for k in EXACT:
            assert got[s][k] == ref[s][k], (s, k, got[s][k], ref[s][k])
        for k in CLOSE:
            unit = 1e-4 if k == "loss" else 1e-3  # printed with 4 / 3 decimals
            assert abs(float(got[s][k]) - float(ref[s][k])) <= 1.01 * unit, (s, k, got[s][k], ref[s][k])


@pytest.mark.slow
def test_rl_two_processes_save_resume_export_match_one_process(rl_setup, tmp_path):
    d, flagfile, cache = rl_setup
    mp, ref, mp1 = tmp_path / "mp", tmp_path / "ref", tmp_path / "mp_then_1"
    t0 = time.monotonic()
    # A: 2 processes save at outer step 2 and leave; the 1-process straight reference runs alongside
    a = RLProcs(tmp_path, "a", mp_argvs(flagfile, mp, 2, "--stop_at=2"), cache)
    r = RLProcs(tmp_path, "ref", [[f"--flagfile={flagfile}", f"--workdir={ref}"]], cache)
    a.wait(300)
    r.wait(300)
    t_a = time.monotonic()
    assert not (mp / "final").exists() and (mp / "checkpoints" / "2").is_dir()
    for i in range(2):
        assert "stopped at step 2/4" in a.stdout(i), a.stdout(i)[-2000:]
    # every process wrote its prompt-stream position (and counters): the same state on both
    data = mp / "checkpoints" / "2" / "data"
    states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] == states[1] and states[0]["counters"]["rollouts"] == 2 * 8, states
    # B: 2 processes resume from step 2, finish at 4 and export. C (alongside): a copy of A's checkpoint resumed by
    # ONE process (another process count: the policy resharded by orbax, the stream from the 2-process files)
    shutil.copytree(mp / "checkpoints", mp1 / "checkpoints")
    b = RLProcs(tmp_path, "b", mp_argvs(flagfile, mp, 2), cache)
    c = RLProcs(tmp_path, "c", [[f"--flagfile={flagfile}", f"--workdir={mp1}", "--notensorboard"]], cache)
    b.wait(300)
    c.wait(300)
    print(f"timings: A+ref {t_a - t0:.1f} s, B+C {time.monotonic() - t_a:.1f} s")
    for out in (b.stdout(0), b.stdout(1), c.stdout(0)):
        assert "resumed from step 2" in out, out[-2000:]
    assert f"step {STEPS}/{STEPS}" in b.stdout(0) and "exported" in b.stdout(0)

    # per-step metrics: the 2-process run (both processes log the same numbers), the 2 -> 1 process resume and the
    # 1-process straight run
    ref_m = _logged(r.stdout(0))
    for i in range(2):
        _assert_same_metrics({**_logged(a.stdout(i)), **_logged(b.stdout(i))}, ref_m, range(1, STEPS + 1))
    _assert_same_metrics({**_logged(a.stdout(0)), **_logged(c.stdout(0))}, ref_m, range(1, STEPS + 1))
    # not vacuous: the reward varies within every step's groups and rows were trained on (the params moved: below)
    rewards = [float(ref_m[s]["reward"]) for s in ref_m]
    assert all(0 < x < 1 for x in rewards) and all(float(ref_m[s]["rows"]) > 4 for s in ref_m), ref_m
    # TensorBoard (float32, process 0 only) of the 2-process run vs the reference: rewards and row counts exactly,
    # the device's numbers to float tolerance (measured: 4e-9 on losses of ~1e-3, 3e-7 relative on KL / grad norm).
    # --adam_eps=1e-3 keeps AdamW from turning float noise into lr-sized steps: with 1e-8, a gradient component that
    # is noise-sized (cancellations under zero-mean advantages) gets a full lr step of its noise's sign, and the
    # 1- and 2-process runs drifted 1-2% apart within 4 steps
    for tag, rtol, atol in (("train/reward", 0, 0), ("train/rows_total", 0, 0), ("train/tpf", 0, 0),
                            ("train/loss", 0, 1e-6), ("train/kl", 1e-4, 0), ("train/ratio", 1e-5, 0),
                            ("train/grad_norm", 1e-4, 0)):
        tb_mp, tb_ref = tb_scalars(str(mp / "tb"), tag), tb_scalars(str(ref / "tb"), tag)
        assert sorted(tb_mp) == sorted(tb_ref) == list(range(1, STEPS + 1)), (tag, tb_mp, tb_ref)
        np.testing.assert_allclose([tb_mp[s] for s in sorted(tb_mp)], [tb_ref[s] for s in sorted(tb_ref)],
                                   rtol=rtol, atol=atol, err_msg=tag)

    # exported params (LoRA merged, gathered from 2 processes) == the 1-process straight run's (which moved away
    # from the init); the same for the 2 -> 1 process resume
    assert_params_close(mp / "final", ref / "final", d / "init")
    assert_params_close(mp1 / "final", ref / "final")


@pytest.mark.slow
def test_rl_value_model_two_processes_match_one_process(rl_setup, tmp_path):
    """TraceRL with the value model (§2.6) multi-host: the value phase all-gathers V_old and places its rows with
    the job's own block feeding, so 2 processes give the 1-process run's value metrics, policy metrics and exported
    policy. 2 outer steps, no resume (the loop's aux-state resume is tested single-process in test_rl_value.py)."""
    d, flagfile, cache = rl_setup
    mp, ref = tmp_path / "mp", tmp_path / "ref"
    extra = ["--rl_objective=tracerl", "--value_model", "--value_lr=1e-2", "--outer_steps=2", "--advantage=z_score",
             "--notensorboard"]
    a = RLProcs(tmp_path, "va", mp_argvs(flagfile, mp, 2, *extra), cache)
    r = RLProcs(tmp_path, "vref", [[f"--flagfile={flagfile}", f"--workdir={ref}", *extra]], cache)
    a.wait(300)
    r.wait(300)
    ref_m = _logged(r.stdout(0))
    for i in range(2):
        _assert_same_metrics(_logged(a.stdout(i)), ref_m, range(1, 3))
        for s in (1, 2):
            for k in ("value_loss", "value_mean", "value_clip_frac"):
                assert abs(float(_logged(a.stdout(i))[s][k]) - float(ref_m[s][k])) <= 1.01e-3, (i, s, k)
    # not vacuous: the value model trained (its head moved off zero, so step 2's values are not all 0) and the
    # policy moved
    assert float(ref_m[2]["value_mean"]) != 0.0 and float(ref_m[1]["value_loss"]) > 0, ref_m
    assert_params_close(mp / "final", ref / "final", d / "init")


_CHECK = r"""
import json, sys
from absl import app, flags
from dlmjax import launch
from dlmjax.launch import rl_flags
F = flags.FLAGS
out = []
for arg in json.loads(sys.argv[1]):
    F.unparse_flags()
    F(["launch", *arg])
    launch.check_job_flags(F.job)
    try:
        rl_flags.check_distributed_flags()
        out.append(None)
    except app.UsageError as e:
        out.append(str(e))
print("RESULT " + json.dumps(out))
"""


def test_rl_distributed_usage_errors(rl_setup, tmp_path):
    """Bad --distributed combinations are refused before jax.distributed.initialize (one interpreter checks them
    all); a batch that does not split over the processes' row shards is found after it, by both processes, each
    with one `error:` line, exit 2 and no traceback (the launcher's whole path)."""
    d, flagfile, _ = rl_setup
    base = [f"--flagfile={flagfile}", f"--workdir={tmp_path / 'w'}"]
    cases = [
        (["--coordinator=127.0.0.1:1234"], "--coordinator needs --distributed"),
        (["--num_processes=2"], "--num_processes needs --distributed"),
        (["--distributed", "--coordinator=127.0.0.1:1234"],
         "--coordinator needs --num_processes and --process_id (explicit multi-process set-up"),
        (["--distributed", "--process_id=0"], "--process_id needs --coordinator and --num_processes"),
        (["--distributed", "--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
         "--process_id=2 must lie in [0, --num_processes=2)"),
        (["--distributed", "--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=1"], None),
        (["--distributed"], None),  # auto-detection (TPU slice / SLURM)
    ]
    r = subprocess.run([sys.executable, "-c", _CHECK, json.dumps([base + c for c, _ in cases])], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    for (argv, want), err in zip(cases, got):
        assert (err is None) if want is None else (err is not None and err.startswith(want)), (argv, err)
    # 1 prompt x G 3 = 3 rollouts over 2 processes (one row shard each): refused by both before any work
    p = RLProcs(tmp_path, "odd", mp_argvs(flagfile, tmp_path / "w2", 2, "--prompts_per_step=1", "--group_size=3"))
    p.wait(180, expect=2)
    for i in range(2):
        err = p.stderr(i)
        assert "error: --prompts_per_step=1 x --group_size=3 = 3 rollouts per step do not split " \
            "over the mesh's data x fsdp = 2 row shards (2 devices, 2 processes)" in err, err[-2000:]
        assert "Traceback" not in err
    assert not (tmp_path / "w2").exists()


# --- launch scripts with an RL recipe -------------------------------------------------------------------------------

def test_tpu_pod_script_runs_rl_multi_host():
    r = script("tpu_pod.sh", "--dry-run", "launch/flags/slim_rl_trado4b_math.flags", "--init_ckpt=/gcs/sdar4b",
                "--data=/gcs/math.jsonl", "--workdir=/mnt/nfs/slim", env={"TPU_NAME": "my-v5p-64", "ZONE": "z"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert "--worker=all" in cmd and "--distributed" in cmd and "--coordinator" not in cmd
    assert "--flagfile=launch/flags/slim_rl_trado4b_math.flags" in cmd and "--workdir=/mnt/nfs/slim" in cmd
    assert "--job=rl" in open(os.path.join(ROOT, "launch", "tpu_pod.sh")).read()


def test_slurm_script_runs_rl_multi_host():
    r = script("slurm_gpu.sh", "--dry-run", "launch/flags/tracerl_trado4b_math.flags", "--workdir=/scratch/tr")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert "srun" in cmd and "--distributed" in cmd and "--coordinator" not in cmd
    assert "--flagfile=launch/flags/tracerl_trado4b_math.flags" in cmd and "--workdir=/scratch/tr" in cmd
    assert "--job=rl" in open(os.path.join(ROOT, "launch", "slurm_gpu.sh")).read()
