"""The device mesh (data, fsdp, tensor) and the sharding rules for params, optimizer state and batches.

GSPMD style: `AxisType.Auto` axes (jax 0.10's `make_mesh` default is Explicit), shardings given on jit inputs and
outputs, the compiler propagates the rest. Rules are MaxText's: weights split their model dim over `fsdp` and their
head / hidden / vocab dim over `tensor`; the batch splits over (data, fsdp). An axis that does not divide a dim is
dropped for that dim (replicated) instead of failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes (data, fsdp, tensor); -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        free = [i for i, d in enumerate(dims) if d == -1]
        _check(len(free) <= 1, "at most one of mesh_data / mesh_fsdp / mesh_tensor may be -1")
        _check(all(d == -1 or d > 0 for d in dims), f"mesh axes {dims} must be positive or -1")
        fixed = 1
        for d in dims:
            fixed *= 1 if d == -1 else d
        if free:
            _check(n_devices % fixed == 0, f"{n_devices} devices do not split into mesh axes {dims}")
            dims[free[0]] = n_devices // fixed
        _check(dims[0] * dims[1] * dims[2] == n_devices,
               f"mesh {dims} (data x fsdp x tensor) needs {dims[0] * dims[1] * dims[2]} devices, have {n_devices}")
        return tuple(dims)



AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Leaf name -> logical axes per dim (layer stacks carry a leading NL dim, never sharded).
_RULES = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("tensor", "fsdp"),
    "final_norm": (None,),
    "wq": (None, "fsdp", "tensor", None), "wk": (None, "fsdp", "tensor", None), "wv": (None, "fsdp", "tensor", None),
    "wo": (None, "tensor", None, "fsdp"),
    "bq": (None, "tensor", None), "bk": (None, "tensor", None), "bv": (None, "tensor", None),
    "w_gate": (None, "fsdp", "tensor"), "w_up": (None, "fsdp", "tensor"), "w_down": (None, "tensor", "fsdp"),
}


def make_mesh(mc: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mc.shape(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _fit(mesh, shape, axes) -> P:
    """PartitionSpec with every axis that does not divide its dim dropped."""
    out = []
    for dim, ax in zip(shape, axes):
        out.append(ax if ax is not None and dim % mesh.shape[ax] == 0 else None)
    return P(*out)


def param_specs(mesh, params) -> dict:
    """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs), by leaf name."""
    def spec(path, x):
        name = path[-1].key
        axes = _RULES.get(name)
        if axes is None or len(axes) != len(x.shape):
            return P()  # norms, q/k norms, LoRA factors: replicated
        return _fit(mesh, x.shape, axes)

    return jax.tree.map_with_path(spec, params)


def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh, ndim: int) -> P:
    return P(BATCH, *([None] * (ndim - 1)))


def batch_shardings(mesh, batch) -> dict:
    return {k: NamedSharding(mesh, batch_spec(mesh, np.ndim(v))) for k, v in batch.items()}


def global_batch(mesh, local: dict, rows: int | None = None) -> dict:
    """Per-process numpy rows -> global jax arrays sharded over (data, fsdp); rows are in process order.
    rows: the global row count, when each process feeds the block `process_rows(mesh, rows)` of a batch that every
    process knows (then the block's place comes from the sharding, not from the process index)."""
    def put(v):
        sh = NamedSharding(mesh, batch_spec(mesh, v.ndim))
        if rows is None:
            return jax.make_array_from_process_local_data(sh, v)
        return jax.make_array_from_process_local_data(sh, v, (rows, *v.shape[1:]))

    return {k: put(v) for k, v in local.items()}


def process_rows(mesh, rows: int) -> slice:
    """The rows [lo, hi) of a global [rows, ...] batch split over (data, fsdp) that this process's devices hold: the
    block it feeds to `global_batch(mesh, block, rows)` (all of them where the batch axes do not span processes).
    rows must be a multiple of data x fsdp."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    _check(rows % n == 0, f"{rows} rows do not split over the mesh's data x fsdp = {n} row shards")
    got = NamedSharding(mesh, batch_spec(mesh, 1)).addressable_devices_indices_map((rows,)).values()
    spans = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop) for s in got})
    lo, hi = spans[0][0], spans[-1][1]
    _check(sum(b - a for a, b in spans) == hi - lo, f"this process's rows {spans} are not one contiguous block")
    return slice(lo, hi)


def replicated(mesh):
    return NamedSharding(mesh, P())
