"""What the Dream decoder tests share (test_decode_dream, test_decode_dream_cache): the prompts, left padding, a
runner for either jitted loop, and the "batched = one at a time" check. The sharpened model is conftest's `dream`."""

import jax
import jax.numpy as jnp
import numpy as np

PROMPTS = [[3, 17, 22, 9, 41], [8, 8, 30, 2, 11, 60, 7, 19], [50, 4]]  # left-padded to P = 8
P = 8
SHARPEN = 5.0  # lm-head scale: a random model is too unsure for thresholds to matter; this makes TPF > 1


def left_pad(prompts, p=P):
    """(ids [B, p] int32, valid [B, p] bool) with each prompt right-aligned."""
    ids = np.zeros((len(prompts), p), np.int32)
    valid = np.zeros((len(prompts), p), bool)
    for i, pr in enumerate(prompts):
        ids[i, p - len(pr):] = pr
        valid[i, p - len(pr):] = True
    return ids, valid


def run_decoder(generate, cfg, dc, params, prompts, replay=None, key=0, lengths=False):
    """generate(cfg, dc, params, ids, prompt_valid, key, replay) on left-padded prompts; prompt_valid as a [B, P]
    mask, or as lengths [B] with lengths=True. Returns host arrays."""
    ids, valid = left_pad(prompts)
    pv = valid.sum(1).astype(np.int32) if lengths else valid
    rp = None if replay is None else {k: jnp.asarray(v) for k, v in replay.items()}
    return jax.device_get(generate(cfg, dc, params, jnp.asarray(ids), jnp.asarray(pv), jax.random.key(key), rp))


def assert_rows_decode_alone(generate, cfg, dc, params, ours, names=("tokens", "step_map", "n_forward")):
    """Each row of a batched result `ours` (of PROMPTS) equals that prompt decoded alone (lengths form)."""
    for i, pr in enumerate(PROMPTS):
        one = run_decoder(generate, cfg, dc, params, [pr], lengths=True)
        for name in names:
            np.testing.assert_array_equal(one[name][0], ours[name][i], err_msg=f"row {i}: {name}")
