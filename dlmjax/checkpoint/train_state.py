"""Train-state checkpoints with orbax's CheckpointManager (v0 API, orbax-checkpoint 0.12.8): the state pytree
(step, params, optimizer state), the grain iterator's position and a JSON record of the run's configs.

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted save (killed job,
full disk) never becomes the "latest" step: `latest_step` only sees finished ones. The RNG needs no saving: every
step's key is fold_in(PRNGKey(seed), step). Restoring takes abstract targets carrying the *current* mesh's
shardings, so a run can resume on a different mesh or process count.
"""

from __future__ import annotations

import errno
import json
import os
import re

import grain
import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run (a different model / objective / data); names the field."""


def manager(directory: str, save_every: int, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager keeping the last `max_to_keep` steps, saving every `save_every` steps (force=True saves now)."""
    # An explicit policy: orbax's default also saves the very first step, which is wasted I/O on a big model.
    policy = ocp.checkpoint_managers.FixedIntervalPolicy(save_every)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, save_decision_policy=policy,
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
    other = _other_process_count_position(mngr, step) if data_iter is not None else None
    if data_iter is not None and other is None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    if other is not None:
        data_iter.set_state(other)
        data_iter.start_prefetch()  # as grain's own CheckpointHandler.restore does
    return out["state"], out["meta"]


def _other_process_count_position(mngr: ocp.CheckpointManager, step: int):
    """None when the checkpoint holds this process's iterator file (the normal case). Otherwise it was saved by a
    different process count: grain keeps one `process_<i>-of-<n>.json` per saving process and would fail on the
    missing file. The SFT iterator's position is the global-batch index, the same in every process, so when all saved
    positions agree that position is valid for any process count; when they differ, refuse."""
    d = mngr.directory / str(step) / "data"  # an epath: local or gs://
    if not d.exists() or (d / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
        return None
    saved = sorted(d.glob("process_*-of-*.json"))
    states = {f.read_text() for f in saved}
    if len(states) != 1:
        raise ResumeError(f"{d}: cannot resume with {jax.process_count()} processes: the data iterator positions "
                          f"saved by another process count ({len(saved)} files) are missing or differ (resume with "
                          "the process count that saved them)")
    return json.loads(states.pop())


def check_compatible(saved: dict, current: dict, keys, where: str):
    """Raise ResumeError naming the first of `keys` whose saved value differs from this run's. A key in
    OPTIONAL_KEYS that the checkpoint does not record (written before the key existed) is not compared."""
    for k in keys:
        if k in OPTIONAL_KEYS and k not in saved:
            continue
        if saved.get(k) != current.get(k):
            if k == "data_fingerprint":
                raise ResumeError(f"{where}: cannot resume: the data file {current.get('data_path')} changed since "
                                  f"this checkpoint was written ({saved.get(k)} then, {current.get(k)} now); "
                                  "restore the file, or start over with a new --workdir or --noresume")
            raise ResumeError(f"{where}: cannot resume: {k} was {saved.get(k)!r} in the checkpoint, now "
                              f"{current.get(k)!r} (use a new --workdir or --noresume)")


OPTIONAL_KEYS = ("data_fingerprint",)


def damaged(mngr: ocp.CheckpointManager, step: int, err: BaseException) -> ResumeError:
    """The error for a latest checkpoint that cannot be read back. We stop rather than fall back to an older step:
    orbax renames a step into place only when it is complete, so a damaged finished step means the files were changed
    from outside (disk fault, partial copy, hand edits) and the user should see it; falling back silently would also
    leave the damaged step as the manager's latest, so later saves and resumes would keep tripping on it."""
    where = os.path.join(str(mngr.directory), str(step))
    older = [s for s in mngr.all_steps() if s < step]
    reason = (str(err).strip().splitlines() or [""])[0][:300]
    then = (f"move it aside to resume from step {max(older)}, the newest before it" if older else
            "move it aside to start over")
    return ResumeError(f"{where}: the latest checkpoint is damaged and cannot be restored ({type(err).__name__}: "
                       f"{reason}); {then}, or use --noresume / a new --workdir")


def read_meta_checked(mngr: ocp.CheckpointManager, step: int) -> dict:
    """read_meta, a damaged step's error as a ResumeError naming it."""
    try:
        meta = read_meta(mngr, step)
    except Exception as e:  # noqa: BLE001  (orbax / tensorstore / json raise many types)
        raise damaged(mngr, step, e) from None
    if not isinstance(meta, dict):
        raise damaged(mngr, step, ValueError(f"meta is a {type(meta).__name__}, not an object"))
    return meta


def restore_checked(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
    """restore, a damaged step's error as a ResumeError naming it (a ResumeError of restore passes unchanged)."""
    try:
        return restore(mngr, step, abstract_state, data_iter)
    except ResumeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise damaged(mngr, step, e) from None


def os_error(err: BaseException, directory: str) -> OSError | None:
    """The OSError behind an orbax / tensorstore save failure (they surface as ValueError / RuntimeError carrying
    `[os_error_code='28']` or the OS message), naming the checkpoint directory; None when it is not an OS error."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    m = re.search(r"os_error_code='?(\d+)", text)
    code = int(m.group(1)) if m else next((c for c in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)
                                           if os.strerror(c) in text), None)
    if code is None:
        return None
    return OSError(code, f"{os.strerror(code)} while saving a checkpoint", directory)
