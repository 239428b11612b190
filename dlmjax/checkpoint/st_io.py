"""Streaming safetensors I/O: read tensors one at a time from single or sharded files, and write files whose header
is known up front so tensors can be appended one by one (peak memory = one tensor, never a second model copy)."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

# safetensors dtype tag <-> numpy dtype
ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
             "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}
DTYPE_NAMES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the key."""


def dtype_name(dt: np.dtype) -> str | None:
    """'float32' / 'bfloat16' / 'float16' for a stored float dtype, None otherwise."""
    return {v: k for k, v in DTYPE_NAMES.items()}.get(np.dtype(dt))


def np_dtype(name: str) -> np.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r} (one of {sorted(DTYPE_NAMES)})") from None


class TensorReader:
    """Lazy view of a safetensors checkpoint: `model.safetensors`, a sharded index, or a single file path."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(index):
                try:
                    with open(index) as f:
                        wm = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
                self.key_file = {k: os.path.join(path, v) for k, v in wm.items()}
            elif os.path.exists(single):
                self.key_file = None
                files = [single]
            else:
                raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")
        else:
            self.key_file, files = None, [path]
        if self.key_file is not None:
            files = sorted(set(self.key_file.values()))
        self._handles = {}
        self.shapes, self.dtypes, self.files = {}, {}, {}
        for fn in files:
            h = self._open(fn)
            for k in h.keys():
                if self.key_file is not None and self.key_file.get(k) != fn:
                    continue  # keys the index does not list in this file are not part of the checkpoint
                sl = h.get_slice(k)
                self.shapes[k] = tuple(sl.get_shape())
                self.dtypes[k] = sl.get_dtype()
                self.files[k] = fn
        if self.key_file is not None:
            for k, fn in self.key_file.items():
                if k not in self.files:
                    raise CheckpointError(f"{fn}: tensor {k!r} is listed in the index but missing from the file")

    def _open(self, fn):
        if fn not in self._handles:
            if not os.path.exists(fn):
                raise CheckpointError(f"{fn}: file not found")
            try:
                self._handles[fn] = safe_open(fn, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
                raise CheckpointError(f"{fn}: not a readable safetensors file ({e})") from None
        return self._handles[fn]

    def keys(self):
        return list(self.shapes)

    def get(self, key: str, index: int | None = None) -> np.ndarray:
        """The tensor (or its `index`-th slice along axis 0, reading only that slice)."""
        fn = self.files[key]
        try:
            h = self._open(fn)
            return h.get_slice(key)[index] if index is not None else h.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{fn}: cannot read tensor {key!r} ({e})") from None


def data_size_bytes(specs: list[tuple[str, np.dtype, tuple]]) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in specs)


class StreamingWriter:
    """Write a safetensors file tensor by tensor. `specs` = [(name, dtype, shape)] in file order."""

    def __init__(self, path: str, specs: list[tuple[str, np.dtype, tuple]], metadata: dict | None = None):
        header, off = {}, 0
        for name, dt, shape in specs:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            header[name] = {"dtype": NP_TO_ST[np.dtype(dt)], "shape": [int(s) for s in shape],
                            "data_offsets": [off, off + n]}
            off += n
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)) + hb)
        self._expect = [(name, np.dtype(dt), tuple(shape)) for name, dt, shape in specs]
        self._pos = 0
        self.path = path

    def write(self, name: str, x: np.ndarray):
        """Append the next tensor (whole) or, for stacked tensors, call `write_part` per slice."""
        ename, dt, shape = self._expect[self._pos]
        if name != ename or tuple(x.shape) != shape or x.dtype != dt:
            raise CheckpointError(f"{self.path}: writer expected {ename} {dt} {shape}, got {name} {x.dtype} {x.shape}")
        self._f.write(np.ascontiguousarray(x).tobytes())
        self._pos += 1

    def write_parts(self, name: str, parts):
        """Append a tensor given as an iterable of axis-0 slices (e.g. one layer at a time)."""
        ename, dt, shape = self._expect[self._pos]
        if name != ename:
            raise CheckpointError(f"{self.path}: writer expected {ename}, got {name}")
        n = 0
        for p in parts:
            if p.dtype != dt or tuple(p.shape) != shape[1:]:
                raise CheckpointError(f"{self.path}: slice {n} of {name}: expected {dt} {shape[1:]}, "
                                      f"got {p.dtype} {p.shape}")
            self._f.write(np.ascontiguousarray(p).tobytes())
            n += 1
        if n != shape[0]:
            raise CheckpointError(f"{self.path}: {name} got {n} slices, expected {shape[0]}")
        self._pos += 1

    def close(self):
        if self._pos != len(self._expect):
            self._f.close()
            raise CheckpointError(f"{self.path}: only {self._pos} of {len(self._expect)} tensors written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
