"""An RL outer step with the code reward end to end (issue 14 §4, last bullet): a tiny SDAR model, `run_rl` with
`RewardConfig(kind="code")` and no reward_fn, so the rewards come from the registry's code reward, i.e. programs run
in the bubblewrap sandbox pool. The model's tokens cannot be controlled, so the task is built for them: the prompt's
prefix holds a function whose answer depends on the first response token (`_ids` is defined by the completion), the
detokenizer writes `_ids = [...]` and closes the block; the reward is then 3 (all tests) if that token is even, else
0, and the job's logged mean reward must equal that recount. A spy counts one sandboxed program per rollout."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from dlmjax.decode.sdar import BlockDecodeConfig
from dlmjax.model.transformer import init_params
from dlmjax.rewards import code as C
from dlmjax.rewards import sandbox as S
from dlmjax.rewards.registry import RewardConfig, make_reward
from dlmjax.rl.config import RLObjectiveConfig
from dlmjax.rl.job import RLRunConfig, run_rl
from dlmjax.train.config import OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig
from tests.workers import sharded_step as W

if os.geteuid() != 0:
    pytest.skip("the sandbox drops programs to unprivileged uids and needs root", allow_module_level=True)

K = 4
PAD = 1  # eos doubles as pad in the tiny config
TESTS = ("assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0")
TASK = C.CodeTask("Write add(a, b).", "function", test_list=TESTS,
                  prefix="```python\ndef add(a, b):\n    return a + b if _ids and _ids[0] % 2 == 0 else -1\n")


def _samples(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_ids": rng.integers(2, W.V - 2, int(rng.integers(3, 7))).tolist(), "task": TASK}
            for _ in range(n)]


def test_rl_outer_steps_with_the_sandboxed_code_reward(tmp_path, monkeypatch):
    seen, submitted = [], []
    real_submit = S.SandboxPool.submit

    def spy(self, source, stdin=b"", timeout_s=None):
        submitted.append(timeout_s)
        return real_submit(self, source, stdin, timeout_s)

    monkeypatch.setattr(S.SandboxPool, "submit", spy)

    def detokenize(ids):
        ids = [int(t) for t in ids]
        seen.append(ids)
        return f"_ids = {ids}\n```"

    cfg = W.tiny("sdar")
    run = RLRunConfig(
        loop=LoopConfig(workdir=str(tmp_path), steps=2, log_every=1, save_every=1, tensorboard=False, export=False,
                        async_save=False),
        objective=RLObjectiveConfig(objective="slim", block_size=K, group_filter="none", head_rows=0),
        rollout=BlockDecodeConfig(block_size=K, steps=K, max_new_tokens=8, rule="tau_budget", stop_ids=(PAD,)),
        reward=RewardConfig(kind="code", workers=2), optim=OptimConfig(lr=1e-3, total_steps=100, schedule="constant"),
        step=StepConfig(global_batch=4, seed=3), prompts_per_step=2, group_size=3)
    out = run_rl(run, cfg, init_params(cfg, jax.random.key(0)), _samples(), detokenize, PAD, log=lambda *_: None,
                 reward_fn=None)
    assert out["status"] == "done" and len(out["history"]) == 2
    per_step = 2 * 3
    assert len(seen) == 2 * per_step  # one completion per rollout reached the reward
    assert len(submitted) == len(seen)  # ... and each ran as one sandboxed program (function task, closed block)
    assert all(t == pytest.approx(TASK.test_time_limit + C.FUNCTION_SLACK_S) for t in submitted)
    expect = np.array([3.0 if ids and ids[0] % 2 == 0 else 0.0 for ids in seen])
    assert set(expect) == {0.0, 3.0}, "the seed should give both outcomes, or the check below proves little"
    for k, h in enumerate(out["history"]):
        assert h["reward"] == pytest.approx(expect[k * per_step:(k + 1) * per_step].mean())
        assert h["reward_failures"] == 0.0 and h["rows"] > 0


def test_make_reward_code_through_the_sandbox():
    """The registry's code reward on completions whose outcome is known: passed tests (count) or their fraction."""
    ok = "Here you go.\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b - 1\n```"
    half = "```python\ndef add(a, b):\n    return 4 if a == 2 else 0\n```"  # passes the 2nd and 3rd asserts only
    task = C.CodeTask("Write add(a, b).", "function", test_list=TESTS)
    samples = [{"task": task}] * 4
    score, close = make_reward(RewardConfig(kind="code", workers=2), 8)
    try:
        vals, failed = score([ok, wrong, half, "no code block"], samples, [8] * 4)
    finally:
        close()
    assert vals.dtype == np.float32 and list(vals) == [3.0, 0.0, 2.0, 0.0] and failed == 0
    score, close = make_reward(RewardConfig(kind="code", workers=1, code_reward="fraction"), 8)
    try:
        vals, _ = score([ok, half], samples[:2], [8] * 2)
    finally:
        close()
    assert list(vals) == pytest.approx([1.0, 2 / 3])
