"""One decoder contract: `generate(decoder_cfg, model_cfg, params, prompts, prompt_lens, key, mesh=None) -> Rollout`.

Every decoder (SDAR block + KV cache, LLaDA, Dream, Fast-dLLM Dream block + cache) is reached through one call with
one prompt convention and one typed result, so the decode job, eval, bench and RL rollouts share it instead of each
picking a loop and reading its own dict.

* Prompts at the boundary are LEFT-PADDED: row b's prompt is prompts[b, P - prompt_lens[b]:]; what the pad columns
  hold does not matter. Inside, each loop gets its own convention: SDAR a left-ALIGNED copy + lengths (its blocks sit
  at absolute positions 0, K, 2K, ... of the real sequence, so the prompt must start at column 0), LLaDA and Dream
  the left-padded ids + a valid mask [B, P]. Same key, same results as calling the loop directly.
* The loop is chosen by the type of `decoder_cfg` (`DECODERS`); `decoder_config(name, **flags)` builds one from flag
  values.
* `mesh` (a `dlmjax.sharding` mesh) with more than one device: the batch runs data-parallel. Rows are split over the
  (data, fsdp) axes, params placed by `sharding.param_specs` (replicated on a data-only mesh), and the same jitted
  loop is compiled for those shardings (GSPMD). GSPMD keeps the loop's global semantics -- the batch-wide
  `while any row is active` tests and Dream's batch-mean schedule see every row, and threefry is partitionable -- so
  the tokens equal one device's. B must be a multiple of data x fsdp (ValueError otherwise): padding rows would
  change the batch-coupled rules (Dream's batch-mean n̄), so it is left to the caller.
* Multi-process (jax.distributed, one process per host): prompts and prompt_lens are GLOBAL jax.Arrays on the mesh,
  each process having fed its block of rows (`sharding.process_rows` / `sharding.global_batch`); the Rollout's
  arrays are global too (gather them with multihost_utils.process_allgather(..., tiled=True)). See rl/job.py.
Notes on every field per loop: docs/decode_api_notes.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from dlmjax import sharding
from dlmjax.config import ModelConfig
from dlmjax.decode.dream import DreamDecodeConfig, diffusion_generate
from dlmjax.decode.dream_cache import DreamCacheDecodeConfig, block_generate_cached
from dlmjax.decode.llada import LLaDADecodeConfig
from dlmjax.decode.llada import generate as llada_generate
from dlmjax.decode.sdar import BlockDecodeConfig, block_generate

__all__ = ["DECODERS", "Rollout", "decoder_config", "decoder_name", "generate", "left_aligned", "left_pad_valid"]

# decoder config type -> the decode job's --decoder name
DECODERS = {BlockDecodeConfig: "sdar", LLaDADecodeConfig: "llada", DreamDecodeConfig: "dream",
            DreamCacheDecodeConfig: "dream"}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("tokens", "lengths", "step_map", "conf", "commits_per_step", "ewc_per_step",
                                "n_steps", "n_forwards", "tpf", "ewc_sum", "n_save", "n_full"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class Rollout:
    """The result of any decoder (a pytree: jit, device_get and tree.map see the arrays). G: completion width
    (max_new_tokens / gen_length), T: the loop's most denoising steps per row.

    A "kept" token is one at index < lengths[b]; past it tokens hold the pad id and step_map / conf hold 0.
    """

    tokens: jax.Array  # [B, G] int32; pad id after lengths (SDAR: cut after the first stop id); LLaDA / Dream keep
    #                    the whole canvas (a never-decoded slot holds the mask id)
    lengths: jax.Array  # [B] int32 kept tokens; = G for LLaDA / Dream (fixed canvas, no stop ids)
    step_map: jax.Array  # [B, G] int32 1-based denoising step of each kept token's commit, 0 = none
    conf: jax.Array  # [B, G] float32 probability of each kept token when committed (0 = none; LLaDA random: 0)
    commits_per_step: jax.Array  # [B, T] int32 slots committed at each step, incl. ones later cut after a stop id
    ewc_per_step: jax.Array  # [B, T] float32 Σ(1 - p) over every slot committed at that step (same slots)
    n_steps: jax.Array  # [B] int32 denoising forwards of the row (the steps step_map counts)
    n_forwards: jax.Array  # [B] int32 all forwards the loop counts for the row (SDAR: + cache-saving forwards)
    tpf: jax.Array  # [B] float32 kept decoded tokens / distinct commit steps
    ewc_sum: jax.Array  # [B] float32 Σ(1 - conf) over kept decoded tokens (expected wrong commits)
    n_save: jax.Array | None = None  # [B] int32 SDAR only: cache-saving forwards (commit nothing; in n_forwards)
    n_full: jax.Array | None = None  # [B] int32 Dream-cached only: block-start full forwards (among n_steps)

    @property
    def kept(self) -> jax.Array:
        """[B, G] bool: index < lengths."""
        return jnp.arange(self.tokens.shape[1])[None] < self.lengths[:, None]


def decoder_name(dc) -> str:
    """The decode job's --decoder name of a decoder config (TypeError for anything else)."""
    try:
        return DECODERS[type(dc)]
    except KeyError:
        raise TypeError(f"not a decoder config: {type(dc).__name__} (expected one of "
                        f"{', '.join(t.__name__ for t in DECODERS)})") from None


def decoder_config(decoder: str, **kw):
    """Frozen decoder config from flag values (bad values / combinations raise ValueError naming the field).
    dream with cache=prefix|dual: Fast-dLLM v1 block + cache decoding (DreamCacheDecodeConfig)."""
    if decoder == "dream" and kw.get("cache", "none") != "none":
        return DreamCacheDecodeConfig(**kw)
    if decoder == "dream":
        kw.pop("cache", None)
    return {"sdar": BlockDecodeConfig, "llada": LLaDADecodeConfig, "dream": DreamDecodeConfig}[decoder](**kw)


# ----------------------------------------------------------------------------------------------------------------------
# prompt conventions

def left_pad_valid(prompt_lens, width: int):
    """[B, width] bool: the prompt columns of left-padded rows (the last prompt_lens[b] columns)."""
    return jnp.arange(width, dtype=jnp.int32)[None] >= (width - prompt_lens.astype(jnp.int32))[:, None]


def left_aligned(prompts, prompt_lens):
    """Left-padded [B, P] -> left-aligned [B, P] (each row rotated left by its pad count; the pad columns move to
    the end, where SDAR ignores them)."""
    p = prompts.shape[1]
    shift = (p - prompt_lens.astype(jnp.int32))[:, None]
    return jnp.take_along_axis(prompts, (jnp.arange(p, dtype=jnp.int32)[None] + shift) % p, axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# one Rollout per loop

def _sdar(dc, cfg, params, prompts, lens, key) -> Rollout:
    r = block_generate(cfg, dc, params, left_aligned(prompts, lens), lens, key)
    return Rollout(tokens=r["tokens"], lengths=r["lengths"], step_map=r["step_map"], conf=r["conf"],
                   commits_per_step=r["commits_per_step"], ewc_per_step=r["ewc_per_step"], n_steps=r["n_denoise"],
                   n_forwards=r["n_denoise"] + r["n_save"], tpf=r["tpf"], ewc_sum=r["ewc"], n_save=r["n_save"])


def _llada(dc, cfg, params, prompts, lens, key) -> Rollout:
    r = llada_generate(cfg, dc, params, prompts, left_pad_valid(lens, prompts.shape[1]), key)
    b, g = r["tokens"].shape
    sm, conf = r["step_map"], r["conf"]
    # LLaDA's loop keeps no per-step Σ(1-p); with no stop ids every commit is kept, so it is the final step map's:
    # each slot is committed once (only masked slots are chosen) -- unless a committed token is the mask id itself
    # (forbid_mask_token=False), which the slot's later, final commit overwrites in step_map / conf.
    t = r["commits_per_step"].shape[1]
    ewc_steps = jnp.zeros((b, t), jnp.float32).at[jnp.arange(b)[:, None], jnp.where(sm > 0, sm - 1, 0)].add(
        jnp.where(sm > 0, 1.0 - conf, 0.0))
    return Rollout(tokens=r["tokens"], lengths=jnp.full((b,), g, jnp.int32), step_map=sm, conf=conf,
                   commits_per_step=r["commits_per_step"], ewc_per_step=ewc_steps, n_steps=r["n_forward"],
                   n_forwards=r["n_forward"], tpf=r["tpf"], ewc_sum=r["ewc"].astype(jnp.float32))


def _dream(dc, cfg, params, prompts, lens, key) -> Rollout:
    fn = block_generate_cached if isinstance(dc, DreamCacheDecodeConfig) else diffusion_generate
    r = fn(cfg, dc, params, prompts, left_pad_valid(lens, prompts.shape[1]), key)
    b, g = r["tokens"].shape
    return Rollout(tokens=r["tokens"], lengths=jnp.full((b,), g, jnp.int32), step_map=r["step_map"], conf=r["conf"],
                   commits_per_step=r["commits_per_step"], ewc_per_step=r["ewc_per_step"], n_steps=r["n_forward"],
                   n_forwards=r["n_forward"], tpf=r["tpf"], ewc_sum=r["ewc"], n_full=r.get("n_full"))


_LOOPS = {BlockDecodeConfig: _sdar, LLaDADecodeConfig: _llada, DreamDecodeConfig: _dream,
          DreamCacheDecodeConfig: _dream}


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _rollout(dc, cfg, params, prompts, lens, key, mesh) -> Rollout:
    """The loop for dc's type, its dict mapped onto a Rollout, in one jit; with a mesh, every output stays split
    over the batch axes (no gather inside the program)."""
    out = _LOOPS[type(dc)](dc, cfg, params, prompts, lens, key)
    if mesh is None:
        return out
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, sharding.batch_spec(mesh, x.ndim))), out)


def _place(mesh, params, prompts, lens, key):
    """Rows over (data, fsdp), params by the sharding rules, the key replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    b = prompts.shape[0]
    if b % n:
        raise ValueError(f"decode.api.generate: batch {b} is not a multiple of the mesh's data x fsdp = {n} row "
                         "shards; pad the batch (padding rows changes batch-coupled rules such as Dream's "
                         "batch-mean schedule, so it is the caller's choice)")
    put = lambda x: jax.device_put(x, NamedSharding(mesh, sharding.batch_spec(mesh, x.ndim)))  # noqa: E731
    params = jax.device_put(params, sharding.shardings(mesh, sharding.param_specs(mesh, params)))
    if _mesh_spans_processes(mesh) and not _spans_processes(key):  # a host-local key -> the same global one
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        data = np.asarray(jax.random.key_data(key) if typed else key)
        key_g = jax.make_array_from_callback(data.shape, sharding.replicated(mesh), lambda i: data[i])
        return params, put(prompts), put(lens), (jax.random.wrap_key_data(key_g, impl=jax.random.key_impl(key))
                                                  if typed else key_g)
    return params, put(prompts), put(lens), jax.device_put(key, sharding.replicated(mesh))


def _spans_processes(x) -> bool:
    """A global jax.Array with rows on other processes' devices (multi-process)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _mesh_spans_processes(mesh) -> bool:
    return mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def generate(decoder_cfg, model_cfg: ModelConfig, params, prompts, prompt_lens, key, mesh=None) -> Rollout:
    """Decode a batch of prompts with the loop of `decoder_cfg`'s type.

    decoder_cfg: BlockDecodeConfig (SDAR), LLaDADecodeConfig, DreamDecodeConfig or DreamCacheDecodeConfig.
    params: in-memory params, stacked or unstacked (`model.unstack_layers`), any dtype the loop takes.
    prompts: [B, P] int ids, LEFT-PADDED (row b = prompts[b, P - prompt_lens[b]:]); prompt_lens: [B] int.
    key: PRNG key (the loops fold it by step; same key + same rows = same rollout, with or without a mesh).
    mesh: optional `dlmjax.sharding` mesh; with more than one device the rows run data-parallel (B must be a
    multiple of data x fsdp). Single process: host arrays, placed on the mesh here. Multi-process: prompts and
    prompt_lens must be global arrays on `mesh` (each process fed its rows; see the module docstring).
    Host-level (not traceable): it checks the lengths and may enable x64 (LLaDA's float64 rules) around the jit.
    """
    if type(decoder_cfg) not in _LOOPS:
        decoder_name(decoder_cfg)  # raises the TypeError
    spans = _spans_processes(prompts) or _spans_processes(prompt_lens)
    if spans and (mesh is None or not (_spans_processes(prompts) and _spans_processes(prompt_lens))):
        raise ValueError("decode.api.generate: prompts and prompt_lens spanning processes must both be global arrays, "
                         "with the mesh they live on")
    if mesh is not None and mesh.size > 1 and _mesh_spans_processes(mesh) and not spans:
        raise ValueError("decode.api.generate: with several processes, prompts and prompt_lens must be global arrays "
                         "on the mesh (each process feeds its rows: sharding.process_rows / sharding.global_batch)")
    prompts = jnp.asarray(prompts, jnp.int32)
    # the range check sees this process's rows of a global array (each process checks its own)
    lens = np.concatenate([np.asarray(s.data) for s in prompt_lens.addressable_shards]) if spans else \
        np.asarray(prompt_lens)
    if prompts.ndim != 2 or tuple(np.shape(prompt_lens)) != prompts.shape[:1]:
        raise ValueError(f"decode.api.generate: prompts must be [B, P] and prompt_lens [B]; got {prompts.shape} "
                         f"and {tuple(np.shape(prompt_lens))}")
    if lens.size and not ((lens >= 0) & (lens <= prompts.shape[1])).all():
        raise ValueError(f"decode.api.generate: prompt_lens must lie in [0, P={prompts.shape[1]}]; got {lens}")
    lens = jnp.asarray(prompt_lens if spans else lens, jnp.int32)
    if mesh is not None and mesh.size > 1:
        params, prompts, lens, key = _place(mesh, params, prompts, lens, key)
    else:
        mesh = None
    x64 = isinstance(decoder_cfg, LLaDADecodeConfig) and decoder_cfg.needs_x64()
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():  # trace LLaDA's float64 rules under x64
        return _rollout(decoder_cfg, model_cfg, params, prompts, lens, key, mesh)

