"""The train step: sharded (8 fake CPU devices, mesh 2x2x2) equals one device for every objective, with and without
LoRA and gradient accumulation; accumulation is exact under batch normalisation; the optimizer matches a NumPy AdamW."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlmjax.model.transformer import init_params
from dlmjax.train import lora as lora_lib
from dlmjax import sharding as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.objective import add_noise
from dlmjax.train.objectives import make_objective
from tests.workers import sharded_step as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tests.workers.sharded_step"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 7
    for r in rows:
        np.testing.assert_allclose(r["loss8"], r["loss1"], rtol=2e-5, err_msg=str(r["case"]))
        assert r["param_rel_diff"] < 2e-5, r
        if r["case"][1] == 0:  # full fine-tuning: the rules really split the weights over fsdp and tensor
            assert r["specs"]["wq"] == "P(None, 'fsdp', 'tensor', None)", r["specs"]
            assert r["specs"]["w_down"] == "P(None, 'tensor', 'fsdp')", r["specs"]


def _setup(accum, norm="batch", lc=LoRAConfig(), eps=1e-8):
    cfg = W.tiny("llada")
    mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
    opt = OptimConfig(lr=1e-2, total_steps=10, warmup_steps=0, schedule="constant", clip_norm=0.0, eps=eps)
    tx = step_lib.make_optimizer(opt)
    params = init_params(cfg, jax.random.key(0))
    split, combine = step_lib.trainable_view(lc, params)
    trainable, frozen = split(params, jax.random.key(1))
    state, sh = step_lib.init_state(mesh, tx, trainable)
    b0 = W.batch(0)
    bsh = mesh_lib.batch_shardings(mesh, b0)
    fsh = None if frozen is None else mesh_lib.shardings(mesh, mesh_lib.param_specs(mesh, frozen))
    sc = StepConfig(global_batch=W.B, grad_accum=accum)
    obj = make_objective(cfg, ObjectiveConfig(norm=norm), W.B)
    fn = step_lib.make_train_step(obj, sc, opt, tx, combine, mesh, sh, fsh, bsh)
    return cfg, params, state, frozen, fn, obj.loss_fn, combine


def _noised(batch, key, step):
    """The loop's batch builder: the step's noise fields from fold_in(key, step)."""
    return add_noise({k: jnp.asarray(v) for k, v in batch.items()}, jax.random.fold_in(key, step))


def test_grad_accumulation_is_exact_with_batch_norm():
    """Noise is drawn per global row, so 4 micro-batches of 2 rows give the same loss and update as one of 8."""
    outs = []
    for accum in (1, 4):
        # a large Adam eps keeps the first update proportional to the gradient (eps=1e-8 would make it sign(g),
        # which amplifies float-rounding differences of near-zero gradient entries)
        _, _, state, frozen, fn, _, _ = _setup(accum, eps=1e-2)
        state, m = fn(state, frozen, _noised(W.batch(0), jax.random.key(3), 0))
        outs.append((float(m["loss"]), jax.tree.map(np.asarray, state["params"]), float(m["grad_norm"])))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
    np.testing.assert_allclose(outs[0][2], outs[1][2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_step_is_adamw_on_the_loss_gradient():
    """One step == NumPy AdamW (bias-corrected, decoupled decay 0) applied to jax.grad of the objective."""
    cfg, params, state, frozen, fn, loss_fn, _ = _setup(1, eps=1e-3)  # eps >> rounding of near-zero grads
    p0 = jax.tree.map(np.asarray, state["params"])
    batch = W.batch(0)
    key = jax.random.key(3)
    jb = _noised(batch, key, 0)
    g = jax.grad(lambda p: loss_fn(p, jb)[0])(params)
    state, m = fn(state, frozen, jb)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-3
    for p_new, p_old, gr in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(p0), jax.tree.leaves(g)):
        gr = np.asarray(gr, np.float64)
        mu, nu = (1 - b1) * gr, (1 - b2) * gr ** 2
        upd = (mu / (1 - b1)) / (np.sqrt(nu / (1 - b2)) + eps)
        np.testing.assert_allclose(np.asarray(p_new), p_old - lr * upd, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(g)), rtol=1e-5)


def test_lora_trains_only_adapters_and_merges():
    lc = LoRAConfig(rank=4, alpha=8.0)
    cfg, params, state, frozen, fn, _, combine = _setup(1, lc=lc)
    base = jax.tree.map(np.asarray, frozen)
    for i in range(3):
        state, m = fn(state, frozen, _noised(W.batch(i), jax.random.key(0), i))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))  # base untouched
    ad = state["params"]
    assert set(ad) == set(lc.targets) and float(jnp.abs(ad["wq"]["b"]).max()) > 0
    merged = lora_lib.merge(lc, frozen, ad)
    a, b = np.asarray(ad["wo"]["a"], np.float64), np.asarray(ad["wo"]["b"], np.float64)
    nl, h, dh, r = a.shape
    ref = base["layers"]["wo"] + (8.0 / 4) * np.einsum("nir,nro->nio", a.reshape(nl, h * dh, r),
                                                        b.reshape(nl, r, -1)).reshape(base["layers"]["wo"].shape)
    np.testing.assert_allclose(np.asarray(merged["layers"]["wo"]), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["embed"]), base["embed"])


def test_lr_schedule_warmup_cosine():
    oc = OptimConfig(lr=1.0, total_steps=110, warmup_steps=10, end_lr_ratio=0.1)
    s = step_lib.lr_schedule(oc)
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="needs 8 devices"):
        MeshConfig(data=2, fsdp=2, tensor=2).shape(4)
    assert MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2)
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        StepConfig(global_batch=6, grad_accum=4)
