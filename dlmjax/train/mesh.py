"""The device mesh (data, fsdp, tensor) and the sharding rules for params, optimizer state and batches.

GSPMD style: `AxisType.Auto` axes (jax 0.10's `make_mesh` default is Explicit), shardings given on jit inputs and
outputs, the compiler propagates the rest. Rules are MaxText's: weights split their model dim over `fsdp` and their
head / hidden / vocab dim over `tensor`; the batch splits over (data, fsdp). An axis that does not divide a dim is
dropped for that dim (replicated) instead of failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dlmjax.train.config import MeshConfig

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


def global_batch(mesh, local: dict) -> dict:
    """Per-process numpy rows -> global jax arrays sharded over (data, fsdp); rows are in process order."""
    return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(mesh, v.ndim)), v)
            for k, v in local.items()}


def replicated(mesh):
    return NamedSharding(mesh, P())
