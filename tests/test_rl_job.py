"""The RL job end to end on a tiny SDAR model: every objective runs outer steps through decode.api rollouts, the
old-policy pass and minibatch updates; rows per rollout are what each method promises; a rerun of the same command
resumes the same run exactly; a reward scorer that raises costs only its sample's reward."""

import jax
import numpy as np
import pytest

from dlmjax.decode.sdar import BlockDecodeConfig
from dlmjax.model.transformer import init_params
from dlmjax.rewards.registry import RewardConfig
from dlmjax.rl.config import RLObjectiveConfig
from dlmjax.rl.job import RLRunConfig, run_rl
from dlmjax.train.config import OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig
from tests.workers import sharded_step as W

K = 4
PAD = 1  # eos doubles as pad in the tiny config


def _samples(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_ids": rng.integers(2, W.V - 2, int(rng.integers(3, 7))).tolist(), "answer": "x"}
            for _ in range(n)]


def _even_reward(completions, samples, n_tokens):
    """A reward that varies between rollouts of one prompt: the fraction of even ids in the response."""
    vals = []
    for c in completions:
        ids = [int(t) for t in c.split()] if c else []
        vals.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return np.asarray(vals, np.float32), 0


def _run(workdir, objective="slim", steps=2, stop_at=0, reward_fn=_even_reward, seed=3, reset=False):
    cfg = W.tiny("sdar")
    rc = RLObjectiveConfig(objective=objective, block_size=K, group_filter="none", head_rows=0)
    run = RLRunConfig(
        loop=LoopConfig(workdir=str(workdir), steps=steps, log_every=1, save_every=1, stop_at=stop_at,
                        tensorboard=False, export=False, async_save=False),
        objective=rc, rollout=BlockDecodeConfig(block_size=K, steps=K, max_new_tokens=8, rule="tau_budget",
                                                stop_ids=(PAD,)),
        reward=RewardConfig(kind="exact", workers=0), optim=OptimConfig(lr=1e-3, total_steps=100, schedule="constant"),
        step=StepConfig(global_batch=4, seed=seed), prompts_per_step=2, group_size=3, reset_optimizer=reset)
    return run_rl(run, cfg, init_params(cfg, jax.random.key(0)), _samples(), lambda ids: " ".join(map(str, ids)),
                  PAD, log=lambda *_: None, reward_fn=reward_fn)


@pytest.mark.parametrize("objective", ["slim", "tracerl", "random", "coupled"])
def test_outer_steps_run_and_count_rows(tmp_path, objective):
    out = _run(tmp_path, objective)
    assert out["status"] == "done" and len(out["history"]) == 2
    h = out["history"][0]
    for k in ("reward", "tpf", "ewc_per_step", "mask_ratio", "kl", "clip_frac", "rows", "rows_total",
              "time_rollout", "time_reward", "time_old_policy", "time_update", "response_len"):
        assert k in h, k
    n_rollouts = 2 * 3
    per = h["rows"] / n_rollouts
    if objective == "slim":
        assert 2.0 <= per <= 3.0  # 3 quadrature rows per rollout, a row dropped only when all its targets are pads
    elif objective == "random":
        assert per <= 1.0 and per > 0.5
    elif objective == "coupled":
        assert 1.0 < per <= 2.0
    else:
        assert per >= 1.0  # TraceRL: one row per (shrunk) decoding step of the longest block
    assert out["history"][1]["rows_total"] == h["rows"] + out["history"][1]["rows"]
    assert h["updates"] == np.ceil(h["rows"] / 4)
    assert 0.0 < h["mask_ratio"] <= 1.0 and h["tpf"] >= 1.0


def test_rerun_resumes_the_same_run(tmp_path):
    straight = _run(tmp_path / "a", steps=4)
    first = _run(tmp_path / "b", steps=4, stop_at=2)
    second = _run(tmp_path / "b", steps=4)
    assert first["status"] == "stopped" and second["history"][0]["step"] == 3
    keys = ("reward", "rows", "rows_total", "loss", "tpf", "kl")
    assert [[h[k] for k in keys] for h in straight["history"][2:]] == [[h[k] for k in keys] for h in second["history"]]
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(second["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p0 = init_params(W.tiny("sdar"), jax.random.key(0))
    assert any(float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0  # a varying reward moves the policy
               for a, b in zip(jax.tree.leaves(straight["state"]["params"]), jax.tree.leaves(p0)))


def test_a_raising_scorer_costs_only_its_samples(tmp_path):
    """The registry's text scorers count a raising sample as reward 0 and go on."""
    from dlmjax.rewards import registry

    def boom(text, answer):
        if text.endswith("2"):
            raise RuntimeError("scorer bug")
        return True

    registry_get = registry.get_scorer
    try:
        registry.get_scorer = lambda name: boom
        score, close = registry.make_reward(RewardConfig(kind="exact", workers=0), 8)
        vals, failed = score(["1 2", "1 3", "4 2"], [{"answer": ""}] * 3, [2, 2, 2])
        close()
    finally:
        registry.get_scorer = registry_get
    assert list(vals) == [0.0, 1.0, 0.0] and failed == 2


def test_reset_optimizer_restarts_adamw_each_outer_step(tmp_path):
    """--reset_optimizer: the optimizer state (and the step counter the LR schedule reads) starts over at every
    outer step, as the references' per-step trainer restarts do; without it they carry over."""
    reset = _run(tmp_path / "r", steps=2, reset=True)
    carry = _run(tmp_path / "c", steps=2)
    assert int(reset["state"]["step"]) == reset["history"][-1]["updates"]
    assert int(carry["state"]["step"]) == sum(h["updates"] for h in carry["history"])
    assert reset["history"][0]["loss"] == carry["history"][0]["loss"]  # same first outer step


@pytest.mark.slow
def test_rl_update_on_8_devices_equals_one():
    """The old-policy pass + minibatch updates on a 2x2x2 mesh of 8 fake CPU devices give one device's losses and
    params (SLIM with and without LoRA, TraceRL with grad accumulation, random masking with LoRA)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tests.workers.rl_mesh"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    for r in rows:
        assert r["rows"][0] == r["rows"][1] > 0, r
        if r["case"][0] in ("slim", "tracerl"):
            assert r["rows"][0] > 8, r  # more than one minibatch: the later ones are off-policy
        np.testing.assert_allclose(r["loss8"], r["loss1"], rtol=2e-5, atol=1e-7, err_msg=str(r["case"]))
        assert r["param_rel_diff"] < 2e-5, r


@pytest.mark.parametrize("objective,align", [("slim", "response"), ("tracerl", "absolute")])
def test_bucketed_prompt_width_changes_nothing(objective, align):
    """The job pads each step's prompts to layout.prompt_width (few distinct shapes, few compiles). Extra left padding
    must not change the rollouts (the SDAR decoder left-aligns prompts) nor the training rows' log-probs and loss
    (prompt pads are never keys; positions count real tokens) under either block alignment."""
    import jax.numpy as jnp

    from dlmjax.decode import api
    from dlmjax.rl.batch import build_rows, make_batch
    from dlmjax.rl.job import left_pad
    from dlmjax.rl.layout import pack_rollouts, prompt_width
    from dlmjax.rl.objectives import make_rl_objective

    cfg = W.tiny("sdar")
    params = init_params(cfg, jax.random.key(0))
    prompts = [s["prompt_ids"] for s in _samples(4, seed=1)]
    longest = max(map(len, prompts))
    wide = prompt_width(longest, K) + K  # wider than the bucket too: any extra padding is harmless
    dc = BlockDecodeConfig(block_size=K, steps=K, max_new_tokens=8, rule="tau_budget", temperature=1.0)
    outs = []
    for width in (longest, wide):
        p, lens = left_pad(prompts, PAD, width)
        ro = jax.device_get(api.generate(dc, cfg, params, jnp.asarray(p), jnp.asarray(lens), jax.random.key(5)))
        outs.append(ro)
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].step_map, outs[1].step_map)
    ro = outs[0]
    resp = [ro.tokens[i, :ro.lengths[i]] for i in range(len(prompts))]
    sms = [ro.step_map[i, :ro.lengths[i]] for i in range(len(prompts))]
    rc = RLObjectiveConfig(objective=objective, block_size=K, group_filter="none", head_rows=0, block_align=align)
    obj = make_rl_objective(cfg, rc)
    adv = np.asarray([0.5, -1.0, 0.25, 1.0], np.float32)
    got = []
    for l0 in (longest, wide):
        packed = pack_rollouts(prompts, resp, PAD, step_maps=sms, max_gen_length=8, l0=l0)
        rows = build_rows(rc, packed, cfg.mask_token_id, np.random.default_rng(0))
        batch = {k: jnp.asarray(v) for k, v in make_batch(packed, rows, adv, 64).items()}
        lp = np.asarray(obj.logprobs(params, batch))
        batch["logp_old"] = jnp.asarray(lp - 0.05)  # off-policy, so the ratio and clipping take part
        loss, _ = obj.loss_fn(params, batch)
        got.append((lp, float(loss), np.asarray(batch["targets"])))
    (lp0, loss0, t0), (lp1, loss1, t1) = got
    np.testing.assert_array_equal(t0, t1)
    assert t0.any()
    np.testing.assert_allclose(lp1[t1], lp0[t0], rtol=1e-5, atol=1e-5)
    assert abs(loss1 - loss0) <= 1e-5 * max(1.0, abs(loss0)), (loss0, loss1)
