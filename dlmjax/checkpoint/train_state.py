"""Train-state checkpoints with orbax's CheckpointManager (v0 API, orbax-checkpoint 0.12.8): the state pytree
(step, params, optimizer state), the grain iterator's position and a JSON record of the run's configs.

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted save (killed job,
full disk) never becomes the "latest" step: `latest_step` only sees finished ones. The RNG needs no saving: every
step's key is fold_in(PRNGKey(seed), step). Restoring takes abstract targets carrying the *current* mesh's
shardings, so a run can resume on a different mesh or process count.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run (a different model / objective / data); names the field."""


def manager(directory: str, save_every: int, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager keeping the last `max_to_keep` steps, saving every `save_every` steps (force=True saves now)."""
    opts = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep, create=True,
                                        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                                 item_names=("state", "data", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict, force: bool = False) -> bool:
    """Save (asynchronously) when the interval says so or force is set; True if a save was started."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what restore reshards onto)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
    """(state, meta) of `step`; the grain iterator (if given) is moved to the saved position in place."""
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]


def check_compatible(saved: dict, current: dict, keys, where: str):
    """Raise ResumeError naming the first of `keys` whose saved value differs from this run's."""
    for k in keys:
        if saved.get(k) != current.get(k):
            raise ResumeError(f"{where}: cannot resume: {k} was {saved.get(k)!r} in the checkpoint, now "
                              f"{current.get(k)!r} (use a new --workdir or --noresume)")
