"""The engine seams: the objective contract (noise from the batch, not the step counter), the sharded token_logprobs
pass vs a direct forward, and the training loop's exact resume with a non-SFT toy objective and its own iterator."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax import model as M
from dlmjax.model.transformer import init_params
from dlmjax import sharding as mesh_lib
from dlmjax.train import step as step_lib
from dlmjax.train.config import LoRAConfig, MeshConfig, ObjectiveConfig, OptimConfig, StepConfig
from dlmjax.train.loop import LoopConfig, TrainJob, run_loop
from dlmjax.train.objective import Objective, add_noise
from dlmjax.train.objectives import make_objective
from tests.workers import sharded_step as W


def _noised(seed, step=0):
    return add_noise({k: jnp.asarray(v) for k, v in W.batch(seed).items()}, jax.random.fold_in(jax.random.key(7), step))


def test_objective_record_validates():
    with pytest.raises(ValueError, match="reduce"):
        Objective("x", lambda p, b: (0.0, {}), ("input_ids",), lambda s: {}, reduce="max")
    with pytest.raises(ValueError, match="batch_keys"):
        Objective("x", lambda p, b: (0.0, {}), (), lambda s: {})


@pytest.mark.parametrize("kind", ["mdlm", "bd3lm", "trims"])
def test_same_batch_same_masks_in_every_pass(kind):
    """Two passes over one batch draw the same masks (old-policy pass / PPO epochs); another step's noise does not."""
    cfg = W.tiny("sdar" if kind == "bd3lm" else "llada")
    params = init_params(cfg, jax.random.key(0))
    obj = make_objective(cfg, ObjectiveConfig(kind=kind, block_size=4), W.B)
    fn = jax.jit(obj.loss_fn)
    b0 = _noised(0)
    (l1, s1), (l2, s2) = fn(params, b0), fn(params, b0)
    assert float(l1) == float(l2) and float(s1["n_masked"]) == float(s2["n_masked"])
    l3, _ = fn(params, _noised(0, step=1))
    assert float(l3) != float(l1)
    assert set(obj.batch_keys) >= {"noise_key", "row", "input_ids"}


@pytest.mark.parametrize("family,kind", [("llada", "mdlm"), ("sdar", "bd3lm")])
def test_token_logprobs_equals_direct_forward(family, kind):
    """token_logprobs (sharded jit, masked-only head) == log_softmax of a direct full forward of the noised rows at
    the masked positions, in float64 NumPy; zero elsewhere; the masked count equals the loss's n_masked."""
    cfg = W.tiny(family)
    params = init_params(cfg, jax.random.key(0))
    oc = ObjectiveConfig(kind=kind, block_size=4, head_rows=5)
    obj = make_objective(cfg, oc, W.B)
    mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
    psh = mesh_lib.shardings(mesh, mesh_lib.param_specs(mesh, params))
    lp_fn = step_lib.make_token_logprobs(obj, lambda t, f: t, mesh, psh, None)
    batch = _noised(3)
    lp = np.asarray(lp_fn(params, None, batch))
    _, sums = obj.loss_fn(params, batch)
    on = lp != 0
    assert on.sum() == int(sums["n_masked"]) > 0
    ids = np.asarray(batch["input_ids"])
    b, n = ids.shape
    # recover the noised input from the masked set and run the model directly (dense head, float64 log-softmax)
    x_t = np.where(on, cfg.mask_token_id, ids)
    if kind == "bd3lm":
        from dlmjax.train import noise
        tokens = np.concatenate([x_t, ids], 1)
        pos = np.tile(np.arange(n), 2)[None].repeat(b, 0)
        mask = jnp.asarray(noise.bd3lm_attention_mask(n, 4))[None]
        logits = np.asarray(M.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(pos), mask))[:, :n]
    else:
        pos = np.arange(n)[None].repeat(b, 0)
        logits = np.asarray(M.forward(cfg, params, jnp.asarray(x_t), jnp.asarray(pos), None))
    logits = logits.astype(np.float64)
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    ref = np.take_along_axis(ref, ids[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp[on], ref[on], rtol=1e-4, atol=1e-5)


def _toy_job(cfg, seed=0):
    """A non-SFT objective (reduce=sum): -sum over rows of row_scale * mean log p(target | all-visible input), fed
    by its own grain iterator over a shuffled index stream."""
    def loss_fn(params, batch):
        ids = batch["input_ids"]
        b, n = ids.shape
        pos = jnp.broadcast_to(jnp.arange(n), (b, n))
        logits = M.forward(cfg, params, ids, pos, None).astype(jnp.float32)
        lp = jax.nn.log_softmax(logits, -1)
        tgt = jnp.take_along_axis(lp, batch["target"][..., None], -1)[..., 0].mean(-1)
        return -(batch["row_scale"] * tgt).sum(), {"lp": tgt.sum(), "rows": jnp.asarray(b, jnp.float32)}

    obj = Objective("toy", loss_fn, ("input_ids", "target", "row_scale"),
                    lambda s: {"mean_lp": s["lp"] / s["rows"]}, reduce="sum")
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, W.V - 1, (64, W.L)).astype(np.int32)
    pool = {"input_ids": ids, "target": (ids + 1) % W.V}  # a rule to learn: predict the next id of each token
    ds = grain.MapDataset.range(64).shuffle(seed=5).repeat(None).batch(
        W.B, batch_fn=lambda idx: {k: v[np.asarray(idx)] for k, v in pool.items()} |
        {"row_scale": np.full(W.B, 1.0 / W.B, np.float32)})
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def advance(ctx, state, frozen, step):
        batch = mesh_lib.global_batch(ctx.mesh, next(it))
        return ctx.step_fn(state, frozen, batch)

    return TrainJob("toy", obj, advance, data_iter=it, meta={"toy": 1}, resume_keys=("toy",))


@pytest.mark.parametrize("lora", [0, 4])
def test_loop_resumes_a_toy_objective_exactly(tmp_path, lora):
    cfg = W.tiny("llada")
    opt = OptimConfig(lr=1e-2, total_steps=6, warmup_steps=0, schedule="constant")
    sc, lc = StepConfig(global_batch=W.B, grad_accum=2), LoRAConfig(rank=lora, alpha=8.0)

    def run(wd, stop_at=0):
        loop = LoopConfig(workdir=str(wd), steps=6, log_every=1, save_every=3, stop_at=stop_at, tensorboard=False,
                          export=False, async_save=False)
        return run_loop(loop, cfg, init_params(cfg, jax.random.key(0)), _toy_job(cfg), opt, sc, MeshConfig(), lc,
                        log=lambda *_: None)

    straight = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_at=3)
    second = run(tmp_path / "b")
    assert first["status"] == "stopped" and second["status"] == "done" and second["history"][0]["step"] == 4
    assert [h["loss"] for h in straight["history"][3:]] == [h["loss"] for h in second["history"]]
    assert "mean_lp" in straight["history"][0]
    assert straight["history"][-1]["mean_lp"] > straight["history"][0]["mean_lp"]  # it learns the toy targets
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(second["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sum_reduction_accumulates_without_averaging():
    """reduce=sum: grad accumulation adds micro-batch losses (each already divided by the global normaliser), so
    accum 1 and accum 4 give the same step; the reported loss is the full-batch loss."""
    cfg = W.tiny("llada")
    job = _toy_job(cfg)
    batch = {k: jnp.asarray(v) for k, v in next(job.data_iter).items()}
    params = init_params(cfg, jax.random.key(0))
    full, _ = job.objective.loss_fn(params, batch)
    outs = []
    for accum in (1, 4):
        mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices()[:1])
        opt = OptimConfig(lr=1e-2, total_steps=2, schedule="constant", clip_norm=0.0, eps=1e-2)
        tx = step_lib.make_optimizer(opt)
        state, sh = step_lib.init_state(mesh, tx, params)
        fn = step_lib.make_train_step(job.objective, StepConfig(global_batch=W.B, grad_accum=accum), opt, tx,
                                      lambda t, f: t, mesh, sh, None, None)
        state, m = fn(state, None, batch)
        outs.append((float(m["loss"]), float(m["grad_norm"])))
    np.testing.assert_allclose(outs[0][0], float(full), rtol=1e-5)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4)
