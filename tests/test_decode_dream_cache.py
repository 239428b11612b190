"""Fast-dLLM v1 Dream block + cache decoding (one jit) vs a plain-Python PyTorch re-statement of the reference loop
(tests/reference/fastdllm_dream_block.py, batch 1 as the reference)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax.checkpoint import load_checkpoint
from dlmjax.decode import dream_cache as DC
from dlmjax.decode.dream_cache import DreamCacheDecodeConfig, block_generate_cached
from tests.dream_common import PROMPTS, assert_rows_decode_alone, left_pad, run_decoder
from tests.reference import fastdllm_dream_block as FB
from tests.reference import hf_models as R

G, BLK = 12, 4  # 3 blocks


def _run(cfg, dc, params, prompts, **kw):
    return run_decoder(block_generate_cached, cfg, dc, params, prompts, **kw)


def _dc(**kw):
    return DreamCacheDecodeConfig(**{"max_new_tokens": G, "block_length": BLK, "steps": G,
                                     "forbid_mask_token": True, **kw})


def _ref(model, cfg, dc, prompt, cache=None, **kw):
    cd = None if dc.conf_dtype is None else getattr(torch, dc.conf_dtype)
    return FB.generate(model, prompt, max_new=dc.max_new_tokens, block=dc.block_length, steps=dc.steps,
                       mask_id=cfg.mask_token_id, cache=cache or dc.cache, rule=dc.rule, tau=dc.tau, eps=dc.eps,
                       temperature=dc.temperature, top_p=dc.top_p, top_k=dc.top_k, alg_temp=dc.alg_temp,
                       conf_dtype=cd, forbid_mask=dc.forbid_mask_token, **kw)


def _check_rows(ours, refs):
    for i, ref in enumerate(refs):
        np.testing.assert_array_equal(ours["tokens"][i], ref["tokens"])
        np.testing.assert_array_equal(ours["step_map"][i], ref["step_map"])
        np.testing.assert_allclose(ours["conf"][i], ref["conf"], atol=1e-4)
        assert ours["n_forward"][i] == ref["n_forward"]


def _recount(out, dc):
    """TPF, expected wrong commits and per-forward counts from the step map and confidences."""
    for i in range(out["tokens"].shape[0]):
        sm, conf = out["step_map"][i], out["conf"][i]
        dec = sm > 0
        assert np.isclose(out["tpf"][i], dec.sum() / len(set(sm[dec].tolist())))
        assert np.isclose(out["ewc"][i], np.sum(1.0 - conf[dec]), atol=1e-5)
        counts = np.array([(sm == s + 1).sum() for s in range(dc.n_iterations)])
        np.testing.assert_array_equal(out["commits_per_step"][i], counts)
        assert np.isclose(out["ewc_per_step"][i].sum(), out["ewc"][i], atol=1e-5)
        assert out["n_full"][i] == dc.num_blocks


# ----------------------------------------------------------------------------------------------------------------------
# no model

def test_config_validation():
    for bad in (dict(rule="maskgit_plus"), dict(cache="none"), dict(block_length=5), dict(steps=4),
                dict(alg_temp=0.5), dict(rule="entropy", max_steps_per_block=3), dict(max_steps_per_block=0),
                dict(top_p=0.0), dict(conf_dtype="float64"), dict(eps=1.0)):
        with pytest.raises(ValueError):
            _dc(**bad)
    with pytest.raises(ValueError, match="steps=4 is not a multiple of the number of blocks 3"):
        _dc(steps=4)
    dc = _dc(steps=9, rule="entropy")
    assert (dc.num_blocks, dc.steps_per_block, dc.n_iterations) == (3, 3, 12)
    assert _dc().n_iterations == 3 * (1 + BLK) and _dc(max_steps_per_block=2).n_iterations == 9


def test_entropy_counts_match_torch():
    """k = int(n̄ · (1 - s/t)) with torch float32 0-d tensors (n̄ = mask_index.sum() / 1), int(n̄) at i = S-1."""
    for blk, steps, eps in [(4, 12, 1e-3), (32, 256, 1e-3), (32, 64, 0.05), (8, 8, 1e-3)]:
        dc = DreamCacheDecodeConfig(max_new_tokens=4 * blk, block_length=blk, steps=steps, eps=eps, rule="entropy")
        s = dc.steps_per_block
        ts = torch.linspace(1, eps, s + 1)
        tab = DC.entropy_counts(dc)
        for i in range(1, s):
            for n in range(blk + 1):
                num = torch.tensor(n) / 1
                assert tab[i, n] == (int(num * (1 - ts[i + 1] / ts[i])) if i < s - 1 else int(num)), (i, n)


# ----------------------------------------------------------------------------------------------------------------------
# vs the torch re-statement (greedy: tokens and step maps identical)

CASES = {  # config, extra lm-head sharpening
    "threshold_prefix": (dict(rule="confidence_threshold", tau=0.7, cache="prefix"), 1.0),
    "threshold_dual": (dict(rule="confidence_threshold", tau=0.9, cache="dual"), 1.0),
    # bf16 confidences: bf16(0.99) = 0.98828125 keeps a pick with c < 0.99 (N5)
    "threshold_dual_bf16": (dict(rule="confidence_threshold", tau=0.99, conf_dtype="bfloat16", cache="dual"), 2.0),
    "entropy_prefix": (dict(rule="entropy", steps=9, cache="prefix"), 1.0),  # S = 3: k = 1, then the rest
    "entropy_dual": (dict(rule="entropy", steps=9, cache="dual"), 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_reference(dream, case):
    """The batched, left-padded loop equals the batch-1 torch reference on every row (tokens, step map, p, forwards),
    its statistics equal a recount from the step map, and the caches are really approximate: the exact block decode
    (full forwards, same loop) commits other tokens or confidences."""
    model, cfg, params = dream
    kw, sharpen = CASES[case]
    if sharpen != 1.0:
        model, params = R.scaled_lm_head(model, sharpen, None), {**params, "lm_head": params["lm_head"] * sharpen}
    dc = _dc(**kw)
    ours = _run(cfg, dc, params, PROMPTS)
    refs = [_ref(model, cfg, dc, pr) for pr in PROMPTS]
    _check_rows(ours, refs)
    _recount(ours, dc)
    assert (ours["step_map"] > 0).all()
    assert sum(r["multi"] for r in refs) >= 5                          # several slots per cached forward
    if dc.rule == "confidence_threshold":                              # forwards are data dependent, per row
        assert len(set(ours["n_forward"].tolist())) > 1
    else:  # one full + S cached forwards per block... minus none: the block ends at i = S - 1 with all committed
        np.testing.assert_array_equal(ours["n_forward"], dc.num_blocks * dc.steps_per_block)
    if case == "threshold_dual_bf16":
        assert sum(r["tau_edge"] for r in refs) > 0
    exact = [_ref(model, cfg, dc, pr, cache="none") for pr in PROMPTS]
    assert any((e["tokens"] != r["tokens"]).any() for e, r in zip(exact, refs))
    assert not np.allclose(np.stack([e["conf"] for e in exact]), ours["conf"], atol=1e-3)
    if case in ("threshold_prefix", "entropy_dual"):  # batched = one at a time
        assert_rows_decode_alone(block_generate_cached, cfg, dc, params, ours)


def test_prefix_and_dual_differ(dream):
    """The two caches are different approximations (dual's suffix K/V are stale, prefix recomputes them)."""
    model, cfg, params = dream
    refs = {c: [_ref(model, cfg, _dc(tau=0.9, cache=c), pr) for pr in PROMPTS] for c in ("prefix", "dual")}
    assert any((a["step_map"] != b["step_map"]).any() or (a["tokens"] != b["tokens"]).any()
               for a, b in zip(refs["prefix"], refs["dual"]))


def test_entropy_one_step_per_block_keeps_masks(dream):
    """S = 1: the reference forwards once more and breaks at i = S before committing: only each block's forced first
    slot is decoded (2 forwards per block)."""
    model, cfg, params = dream
    dc = _dc(rule="entropy", steps=3, cache="prefix")
    ours = _run(cfg, dc, params, PROMPTS)
    refs = [_ref(model, cfg, dc, pr) for pr in PROMPTS]
    _check_rows(ours, refs)
    _recount(ours, dc)
    want = np.zeros(G, np.int64)
    want[::BLK] = [1, 3, 5]
    np.testing.assert_array_equal(ours["step_map"], np.broadcast_to(want, (3, G)))
    assert (ours["tokens"][:, 1:BLK] == cfg.mask_token_id).all()


# ----------------------------------------------------------------------------------------------------------------------
# sampled: the reference's draws replayed

@pytest.mark.parametrize("kw", [dict(rule="confidence_threshold", tau=0.8, cache="dual", temperature=0.7, top_p=0.95),
                                dict(rule="entropy", steps=9, cache="prefix", temperature=1.0, alg_temp=0.5)],
                         ids=["threshold_dual", "entropy_prefix_alg_temp"])
def test_sampled_with_replayed_draws_matches_reference(dream, kw):
    model, cfg, params = dream
    dc = _dc(**kw)
    refs = [_ref(model, cfg, dc, pr, seed=11 + i) for i, pr in enumerate(PROMPTS)]
    tokens = np.full((len(PROMPTS), dc.n_iterations, G), cfg.mask_token_id, np.int32)
    gumbel = np.zeros((len(PROMPTS), dc.n_iterations, G), np.float32)
    for i, r in enumerate(refs):
        tokens[i, :r["n_forward"]] = r["draws"]
        gumbel[i, :r["n_forward"]] = r["gumbel"]
    replay = {"tokens": tokens, **({"gumbel": gumbel} if dc.uses_alg_temp else {})}
    ours = _run(cfg, dc, params, PROMPTS, replay=replay)
    _check_rows(ours, refs)
    _recount(ours, dc)
    greedy = _ref(model, cfg, dataclasses.replace(dc, temperature=0.0, alg_temp=None), PROMPTS[0])
    assert (greedy["tokens"] != refs[0]["tokens"]).any()              # the draws matter


def test_deterministic_given_seed_bf16(dream):
    """Production path: PRNG key (no replay), bf16 activations and confidences (the reference's dtype)."""
    _, cfg, params = dream
    cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    dc = _dc(tau=0.9, cache="prefix", temperature=1.0, top_p=0.95)
    a, b, c = (_run(cfg, dc, params, PROMPTS, key=k) for k in (5, 5, 6))
    for name in ("tokens", "step_map", "n_forward"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["tokens"], c["tokens"])
    conf = a["conf"][a["step_map"] > 0]
    np.testing.assert_array_equal(conf.astype(jnp.bfloat16).astype(np.float32), conf)  # p is a bf16 value
    _recount(a, dc)


def test_unstacked_params_equal_stacked(dream):
    """Per-layer (unstacked) params run the same decode with a per-layer cache (dual: carried through fori_loop)."""
    from dlmjax import model as M

    _, cfg, params = dream
    dc = _dc(tau=0.9, cache="dual")
    a = _run(cfg, dc, params, PROMPTS)
    b = _run(cfg, dc, M.unstack_layers(params), PROMPTS)
    for name in ("tokens", "step_map", "n_forward"):
        np.testing.assert_array_equal(a[name], b[name])


def test_max_steps_per_block_guard(dream):
    """max_steps_per_block caps each block's cached forwards: the first block keeps what the uncapped run decoded
    in its first two forwards, its other slots stay masked; every row runs 2 forwards per block."""
    model, cfg, params = dream
    dc = _dc(tau=0.9, cache="prefix", max_steps_per_block=1)
    capped = _run(cfg, dc, params, PROMPTS)
    np.testing.assert_array_equal(capped["n_forward"], [2 * dc.num_blocks] * len(PROMPTS))
    _recount(capped, dc)
    full = np.stack([_ref(model, cfg, dc, pr)["step_map"][:BLK] for pr in PROMPTS])
    assert (full > 2).any()
    np.testing.assert_array_equal(capped["step_map"][:, :BLK], np.where(full <= 2, full, 0))
    assert ((capped["step_map"] > 0).sum(1) >= 2 * dc.num_blocks).all()


# ----------------------------------------------------------------------------------------------------------------------
# the decode job

@pytest.mark.slow
def test_decode_job_dream_cache(imported, tmp_path):
    import json

    from tests.launcher import launch

    _, ckpt, _, _ = imported("dream")
    lines = [[5, 9, 33], [40, 2, 17, 8, 8]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_ids": x}) + "\n" for x in lines))
    io = (f"--ckpt={ckpt}", f"--prompts={tmp_path / 'p.jsonl'}", f"--out={tmp_path / 'o.jsonl'}", "--job=decode",
          "--decoder=dream")
    r = launch(*io, "--dream_cache=dual", "--block_size=4", "--max_new_tokens=8", "--tau=0.5", "--forbid_mask_token",
               "--batch_size=2")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(len(x["ids"]) == 8 and x["full_forwards"] == 2 for x in recs)
    # the job's rows equal a direct call with the same settings (greedy; left-padded to the 16-wide bucket)
    cfg, params = load_checkpoint(ckpt)
    dc = DreamCacheDecodeConfig(max_new_tokens=8, block_length=4, steps=8, cache="dual", tau=0.5,
                                forbid_mask_token=True)
    ids, valid = left_pad(lines, p=16)
    direct = jax.device_get(block_generate_cached(cfg, dc, params, ids, valid, jax.random.key(0)))
    for i, rec in enumerate(recs):
        assert rec["ids"] == direct["tokens"][i].tolist() and rec["step_map"] == direct["step_map"][i].tolist()
        assert rec["forwards"] == int(direct["n_forward"][i])
    r = launch(*io, "--dream_cache=prefix", "--rule=dynamic")
    assert r.returncode != 0 and "--rule is not used by --dream_cache=prefix" in r.stderr
    r = launch(*io, "--dream_cache=prefix", "--dream_alg=maskgit_plus")
    assert r.returncode != 0 and "rule='maskgit_plus' is not one of" in r.stderr
