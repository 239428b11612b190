"""The multi-host path on one CPU box: 2 JAX processes on localhost (gloo CPU collectives, one CPU device each) run the
real launcher (`python -m dlmjax.launch --job=sft --distributed --coordinator=...`): save at step 2 and leave, resume
at step 2 with 2 processes (and, from a copy, with 1 process) and export `final/`; a 1-process straight run must give
the same per-step losses and the same exported params (global batches do not depend on the process count: each
process feeds its contiguous block of the same global batch). A SIGTERM reaching one process stops both at the same
step. Plus dry runs of the TPU-pod / SLURM launch scripts and a parse check of every recipe in launch/flags/.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlmjax.checkpoint import save_checkpoint
from dlmjax.data import addition
from dlmjax.demo import DemoConfig, model_config
from dlmjax.train.sft import build_model
from tests.launcher import ROOT, Procs, assert_params_close, child_env, mp_argvs, script, tb_scalars

DC = DemoConfig(hidden=32, layers=2, heads=2, max_digits=2, gen_length=10)  # rows of 7 + 10 tokens
STEPS = 4


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    """A tiny init checkpoint, the addition task and a flagfile shared by every run (workdir given per run)."""
    d = tmp_path_factory.mktemp("mp")
    tok = addition.make_tokenizer()
    train, _ = addition.make_splits(96, 8, 2, seed=0)
    addition.write_jsonl(str(d / "train.jsonl"), train)
    cfg = model_config(DC, tok)
    tok.save_pretrained(str(d / "tok"))
    save_checkpoint(cfg, jax.tree.map(np.asarray, build_model(cfg, 0)), str(d / "init"), tokenizer_dir=str(d / "tok"))
    flagfile = d / "sft.flags"
    flagfile.write_text("\n".join([
        "--job=sft", f"--init_ckpt={d / 'init'}", f"--data={d / 'train.jsonl'}", f"--train_steps={STEPS}",
        "--batch_size=8", "--max_length=16", "--lr=3e-3", "--log_every=1", "--save_every=2", "--keep=3",
        "--lora_rank=4", "--lora_alpha=8", "--seed=1"]) + "\n")
    return d, flagfile, d / "jax_cache"


def _logged_losses(stdout):
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+)/\d+ loss (\S+)", stdout, re.M)}


@pytest.mark.slow
def test_two_processes_save_resume_export_match_one_process(sft_setup, tmp_path):
    d, flagfile, cache = sft_setup
    mp, ref, mp1 = tmp_path / "mp", tmp_path / "ref", tmp_path / "mp_then_1"
    t0 = time.monotonic()
    # A: 2 processes save at step 2 and leave (as a preemption would); the 1-process straight reference runs alongside
    a = Procs(tmp_path, "a", mp_argvs(flagfile, mp, 2, "--stop_at=2"), cache)
    r = Procs(tmp_path, "ref", [[f"--flagfile={flagfile}", f"--workdir={ref}"]], cache)
    a.wait(240)
    r.wait(240)
    t_a = time.monotonic()
    assert not (mp / "final").exists() and (mp / "checkpoints" / "2").is_dir()
    assert "stopped at step 2/4" in a.stdout(0) and "stopped at step 2/4" in a.stdout(1)
    # every process wrote its own grain iterator position; only process 0 writes TensorBoard
    assert sorted(glob.glob("*.json", root_dir=mp / "checkpoints" / "2" / "data")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert len(glob.glob(str(mp / "tb" / "events.out.tfevents.*"))) == 1
    # B: 2 processes resume from step 2, finish at 4 and export. C (alongside): a copy of A's checkpoint resumed by
    # ONE process (another process count: params resharded by orbax, data position from the 2-process files)
    shutil.copytree(mp / "checkpoints", mp1 / "checkpoints")
    b = Procs(tmp_path, "b", mp_argvs(flagfile, mp, 2), cache)
    c = Procs(tmp_path, "c", [[f"--flagfile={flagfile}", f"--workdir={mp1}", "--notensorboard"]], cache)
    b.wait(240)
    c.wait(240)
    print(f"timings: A+ref {t_a - t0:.1f} s, B+C {time.monotonic() - t_a:.1f} s")
    out_b = b.stdout(0)
    for out in (out_b, b.stdout(1), c.stdout(0)):
        assert "resumed from step 2" in out, out[-2000:]
    assert f"step {STEPS}/{STEPS}" in out_b and "exported" in out_b

    # per-step losses: printed (4 decimals) and TensorBoard (float32) of the 2-process runs vs the 1-process run
    logged_mp = {**_logged_losses(a.stdout(0)), **_logged_losses(out_b)}
    logged_ref = _logged_losses(r.stdout(0))
    logged_mp1 = {**_logged_losses(a.stdout(0)), **_logged_losses(c.stdout(0))}
    assert sorted(logged_mp) == sorted(logged_ref) == sorted(logged_mp1) == list(range(1, STEPS + 1)), \
        (logged_mp, logged_ref, logged_mp1)
    for s in logged_ref:
        assert abs(logged_mp[s] - logged_ref[s]) <= 1.5e-4, (s, logged_mp[s], logged_ref[s])
        assert abs(logged_mp1[s] - logged_ref[s]) <= 1.5e-4, (s, logged_mp1[s], logged_ref[s])
    tb_mp, tb_ref = tb_scalars(str(mp / "tb")), tb_scalars(str(ref / "tb"))
    assert sorted(tb_mp) == sorted(tb_ref) == list(range(1, STEPS + 1)), (tb_mp, tb_ref)
    np.testing.assert_allclose([tb_mp[s] for s in sorted(tb_mp)], [tb_ref[s] for s in sorted(tb_ref)], rtol=1e-5)

    # exported final params (LoRA merged, gathered from 2 processes) == the 1-process straight run's; the same for
    # the 2 -> 1 process resume
    assert_params_close(mp / "final", ref / "final", d / "init")
    assert_params_close(mp1 / "final", ref / "final")


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step(sft_setup, tmp_path):
    """Preemption notice (SIGTERM) reaching only process 1: JAX's preemption sync service makes both processes save
    the same step and leave cleanly (a per-process flag would leave process 0 alone in the next collective). The
    signal is sent before step 1, so the run cannot finish first; the agreed step is then the first one."""
    d, flagfile, cache = sft_setup
    w = tmp_path / "w"
    p = Procs(tmp_path, "p", mp_argvs(flagfile, w, 2), cache)
    deadline = time.monotonic() + 180
    # "data: ..." is printed after jax.distributed.initialize (whose notifier owns SIGTERM from then on) and before
    # the first step
    while "data:" not in p.stdout(1) and time.monotonic() < deadline and p.procs[1].poll() is None:
        time.sleep(0.2)
    if "data:" not in p.stdout(1):
        p.wait(1)  # kills both and fails with their stderr tails
        pytest.fail("process 1 never reached the training loop")
    p.procs[1].send_signal(signal.SIGTERM)
    p.wait(180)
    got = [re.findall(r"^preempted at step (\d+)/", p.stdout(i), re.M) for i in range(2)]
    assert got[0] and got[0] == got[1], got
    k = int(got[0][0])
    assert k < STEPS and not (w / "final").exists()
    assert sorted(glob.glob("*.json", root_dir=w / "checkpoints" / str(k) / "data")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


# --- launch scripts -------------------------------------------------------------------------------------------------

def test_tpu_pod_script_dry_run():
    r = script("tpu_pod.sh", "--dry-run", "launch/flags/trims_llada8b.flags", "--init_ckpt=/gcs/x",
                env={"TPU_NAME": "my-v5p-64", "ZONE": "us-east5-a"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert "gcloud compute tpus tpu-vm ssh my-v5p-64" in cmd and "--zone=us-east5-a" in cmd
    assert "--worker=all" in cmd and "--distributed" in cmd and "--coordinator" not in cmd
    assert "--flagfile=launch/flags/trims_llada8b.flags" in cmd and "--init_ckpt=/gcs/x" in cmd
    assert "DLMJAX_JAX_EXTRA=tpu" in cmd
    r = script("tpu_pod.sh", "--dry-run", "launch/flags/trims_llada8b.flags", env={"ZONE": "z"})
    assert r.returncode != 0 and "TPU_NAME" in r.stderr
    r = script("tpu_pod.sh", env={"TPU_NAME": "t", "ZONE": "z"})
    assert r.returncode != 0 and "usage" in r.stderr.lower()


def test_slurm_script_dry_run():
    r = script("slurm_gpu.sh", "--dry-run", "launch/flags/llada_mdlm_sft.flags", "--workdir=/scratch/run1")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert "srun" in cmd and "python -m dlmjax.launch" in cmd and "--distributed" in cmd
    assert "--flagfile=launch/flags/llada_mdlm_sft.flags" in cmd and "--workdir=/scratch/run1" in cmd
    assert "--coordinator" not in cmd
    r = script("slurm_gpu.sh", "--dry-run")
    assert r.returncode != 0 and "usage" in r.stderr.lower()
    sb = open(os.path.join(ROOT, "launch", "slurm_gpu.sh")).read()
    for d in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node="):
        assert d in sb


# --- recipe flagfiles -----------------------------------------------------------------------------------------------

RECIPES = {"llada_mdlm_sft.flags": "sft", "trims_llada8b.flags": "sft", "trims_dream7b.flags": "sft",
           "trims_score_qwen3_8b.flags": "trims_score"}

# Runs in a fresh interpreter (absl's global FLAGS): for each recipe, absl parses the flagfile + path overrides
# (unknown flag / bad value -> error), the launcher's per-job check runs (a flag the job does not use -> UsageError),
# the sft configs are built exactly as the job builds them (every cross-field check in the config dataclasses; the
# example count for --epochs is stubbed: s1K's 1000), then the job itself starts and must fail on the first input it
# opens, the (nonexistent) checkpoint / tokenizer path, not on anything else.
_VALIDATE = r"""
import contextlib, io, json, sys
from absl import flags
from dlmjax import launch
from dlmjax.launch import train_flags

F = flags.FLAGS
out = {}
for arg in json.loads(sys.argv[1]):
    F.unparse_flags()
    F(["launch", *arg])
    launch.check_job_flags(F.job)
    row = {"job": F.job}
    if F.job == "sft":
        run = train_flags.sft_configs(lambda: 1000)
        job, data, oc, opt, sc, mc, lc = run.loop, run.data, run.objective, run.optim, run.step, run.mesh, run.lora
        row.update(steps=job.steps, warmup=opt.warmup_steps, lr=opt.lr, objective=oc.kind, norm=oc.norm,
                   weight=oc.weight, rank=lc.rank, alpha=lc.alpha, batch=sc.global_batch, accum=sc.grad_accum,
                   max_length=data.max_length, K=oc.num_buckets, p=[oc.p_high, oc.p_low, oc.rho],
                   dtypes=[F.param_dtype, F.compute_dtype])
    else:
        row.update(K=F.num_buckets, order=F.bucket_order, difficulty=F.difficulty, max_length=F.max_length)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = launch.main(["launch"])  # input errors are printed and give exit code 2
        row["error"] = err.getvalue() if rc else None
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    out[arg[0]] = row
print("RESULT " + json.dumps(out))
"""


def test_recipe_flagfiles_parse(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    argvs = []
    for name, job in RECIPES.items():
        path = os.path.join(ROOT, "launch", "flags", name)
        over = ([f"--init_ckpt={missing}", f"--workdir={tmp_path / 'w'}"] if job == "sft" else
                [f"--teacher_ckpt={missing}", f"--student_tokenizer={missing}", f"--out={tmp_path / 'o.jsonl'}"])
        argvs.append([f"--flagfile={path}", f"--data={tmp_path / 'd.jsonl'}", *over])
    r = subprocess.run([sys.executable, "-c", _VALIDATE, json.dumps(argvs)], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    got = {os.path.basename(k.split("=", 1)[1]): v for k, v in res.items()}
    assert sorted(got) == sorted(RECIPES)
    for name, row in got.items():
        assert row["job"] == RECIPES[name]
        # the job got past every flag check and failed on the missing checkpoint / tokenizer directory
        assert row["error"] and missing in row["error"], (name, row["error"])
    llada = got["llada_mdlm_sft.flags"]
    assert (llada["objective"], llada["norm"], llada["lr"], llada["rank"]) == ("mdlm", "sequence", 2e-5, 0)
    assert llada["steps"] == 5 * 1000 // 32 and llada["warmup"] == round(0.1 * llada["steps"])
    assert llada["dtypes"] == ["float32", "bfloat16"]
    for name in ("trims_llada8b.flags", "trims_dream7b.flags"):
        t = got[name]
        assert (t["objective"], t["K"], t["p"], t["lr"], t["rank"], t["alpha"]) == \
            ("trims", 8, [0.95, 0.05, 0.5], 1e-4, 32, 64.0), t
        assert (t["batch"], t["accum"], t["max_length"], t["norm"]) == (32, 4, 1024, "token")
        assert t["steps"] == 30 * 1000 // 32 and t["warmup"] == round(0.03 * t["steps"])
    assert got["trims_dream7b.flags"]["weight"] == "cart" and got["trims_llada8b.flags"]["weight"] == "scheduler"
    sc = got["trims_score_qwen3_8b.flags"]
    assert (sc["K"], sc["order"], sc["difficulty"], sc["max_length"]) == (8, "descending", "nll", 1024)
