"""HF checkpoints <-> dlmjax checkpoints, streamed one tensor at a time, validated before anything is written.

A dlmjax checkpoint is a directory:
  config.json          the family's own config (LLaDA / Dream / SDAR / Llama / Qwen keys), as released
  dlmjax.json          {"format": "dlmjax", "version": 1, "family": ..., "dtype": ...}
  params.safetensors   flat names of the params pytree ("embed", "layers.wq", ...), layers stacked on axis 0
  tokenizer files      copied from the source (tokenizer.json, tokenizer_config.json, chat template, ...)
Every write goes to a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from dlmjax.config import ConfigError, ModelConfig, from_hf_config, param_shapes, to_hf_config
from dlmjax.checkpoint import naming
from dlmjax.checkpoint.st_io import (NP_TO_ST, ST_DTYPES, CheckpointError, StreamingWriter, TensorReader,
                                     data_size_bytes, dtype_name, np_dtype)

FORMAT = {"format": "dlmjax", "version": 1}
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
    """Yield a temporary directory next to `dst`; rename it to `dst` only if the block finishes without error."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rename(dst, os.path.join(trash, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _copy_tokenizer(src_dir: str | None, dst_dir: str):
    if not src_dir:
        return
    for fn in TOKENIZER_FILES:
        p = os.path.join(src_dir, fn)
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(dst_dir, fn))


def our_specs(cfg: ModelConfig, dtype: np.dtype) -> list[tuple[str, np.dtype, tuple]]:
    return [(k, dtype, tuple(s)) for k, s in naming.flatten_names(param_shapes(cfg)).items()]


# --------------------------------------------------------------------------------------------------------------
# Import


def _plan_import(cfg: ModelConfig, reader: TensorReader):
    """Check names, count and every shape before reading data. Returns the table."""
    entries = naming.table(cfg)
    specs = dict((k, s) for k, _, s in our_specs(cfg, np.dtype(np.float32)))
    expected = {}
    for e in entries:
        shape = specs[e.ours]
        if e.per_layer:
            for i in range(cfg.num_layers):
                expected[e.hf.format(i=i)] = naming.hf_shape(e, shape[1:])
        else:
            expected[e.hf] = naming.hf_shape(e, shape)
    tied_key = naming.tied_head_key(cfg)
    for key in reader.keys():
        if key in expected or key.endswith(naming.IGNORED_SUFFIXES):
            continue
        if cfg.tie_word_embeddings and key == tied_key:
            continue  # some tied checkpoints still save the head; it is the embedding (ignored, as transformers does)
        raise CheckpointError(f"{reader.files[key]}: unexpected tensor {key!r} for a {cfg.family} model with "
                              f"{cfg.num_layers} layers (config/weights mismatch?)")
    for key, shape in expected.items():
        if key not in reader.shapes:
            where = reader.path
            if key == tied_key:
                raise CheckpointError(f"{where}: missing tensor {key!r} (config says tie_word_embeddings=false)")
            raise CheckpointError(f"{where}: missing tensor {key!r}")
        if reader.shapes[key] != shape:
            raise CheckpointError(f"{reader.files[key]}: tensor {key!r} has shape {list(reader.shapes[key])}, "
                                  f"the config implies {list(shape)}")
        if reader.dtypes[key] not in ST_DTYPES:
            raise CheckpointError(f"{reader.files[key]}: tensor {key!r} has unsupported dtype {reader.dtypes[key]}")
    return entries


def _source_dtype(reader: TensorReader, entries) -> np.dtype:
    tags = {reader.dtypes[e.hf.format(i=0)] for e in entries}
    if len(tags) != 1:
        raise CheckpointError(f"{reader.path}: tensors have mixed dtypes {sorted(tags)}; pass an explicit dtype")
    return ST_DTYPES[tags.pop()]


def import_hf(src: str, dst: str, family: str = "auto", dtype: str = "auto", overwrite: bool = False) -> ModelConfig:
    """Convert an HF-layout checkpoint directory (or a .gguf file) into a dlmjax checkpoint at `dst`."""
    if src.endswith(".gguf"):
        from dlmjax.checkpoint.gguf import gguf_to_hf

        with tempfile.TemporaryDirectory() as hf_dir:
            gguf_to_hf(src, hf_dir)
            return import_hf(hf_dir, dst, family, dtype, overwrite)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory (expected an HF checkpoint directory or a .gguf file)")
    cfg_path = os.path.join(src, "config.json")
    raw = _read_json(cfg_path)
    cfg = from_hf_config(raw, family, source=cfg_path)
    reader = TensorReader(src)
    entries = _plan_import(cfg, reader)
    out_dt = _source_dtype(reader, entries) if dtype == "auto" else np_dtype(dtype)
    dt_name = dtype_name(out_dt)
    if dt_name is None:
        raise CheckpointError(f"{src}: source dtype {out_dt} is not a float type dlmjax stores; pass --dtype")
    by_ours = {e.ours: e for e in entries}
    with atomic_dir(dst, overwrite) as tmp:
        specs = our_specs(cfg, out_dt)
        w = StreamingWriter(os.path.join(tmp, PARAMS_FILE), specs, {"format": "dlmjax"})
        for name, _, _ in specs:
            e = by_ours[name]
            if e.per_layer:
                w.write_parts(name, (naming.to_ours(e, reader.get(e.hf.format(i=i))).astype(out_dt)
                                     for i in range(cfg.num_layers)))
            else:
                w.write(name, naming.to_ours(e, reader.get(e.hf)).astype(out_dt))
        w.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(raw, f, indent=2)
        with open(os.path.join(tmp, "dlmjax.json"), "w") as f:
            json.dump({**FORMAT, "family": cfg.family, "dtype": dt_name, "source": os.path.abspath(src)}, f, indent=2)
        _copy_tokenizer(src, tmp)
    return cfg.replace(param_dtype=dt_name)


# --------------------------------------------------------------------------------------------------------------
# dlmjax checkpoints


def read_checkpoint_config(path: str, **overrides) -> tuple[ModelConfig, dict]:
    meta = _read_json(os.path.join(path, "dlmjax.json"))
    if meta.get("format") != "dlmjax":
        raise CheckpointError(f"{path}/dlmjax.json: not a dlmjax checkpoint (format={meta.get('format')!r})")
    raw = _read_json(os.path.join(path, "config.json"))
    ov = {"param_dtype": meta.get("dtype", "float32"), **overrides}
    try:
        cfg = from_hf_config(raw, meta["family"], source=os.path.join(path, "config.json"), **ov)
    except KeyError:
        raise CheckpointError(f"{path}/dlmjax.json: field 'family' is missing") from None
    return cfg, raw


def _checked_reader(path: str, cfg: ModelConfig) -> TensorReader:
    fn = os.path.join(path, PARAMS_FILE)
    reader = TensorReader(fn)
    specs = {k: s for k, _, s in our_specs(cfg, np.dtype(np.float32))}
    for k in reader.keys():
        if k not in specs:
            raise CheckpointError(f"{fn}: unexpected tensor {k!r}")
    for k, s in specs.items():
        if k not in reader.shapes:
            raise CheckpointError(f"{fn}: missing tensor {k!r}")
        if reader.shapes[k] != s:
            raise CheckpointError(f"{fn}: tensor {k!r} has shape {list(reader.shapes[k])}, config implies {list(s)}")
    return reader


def load_checkpoint(path: str, dtype: str | None = None, **overrides):
    """(config, params) from a dlmjax checkpoint. `dtype` casts params (and sets cfg.param_dtype)."""
    import jax.numpy as jnp

    if dtype is not None:
        overrides["param_dtype"] = dtype
    cfg, _ = read_checkpoint_config(path, **overrides)
    reader = _checked_reader(path, cfg)
    dt = jnp.dtype(cfg.param_dtype)
    flat = {k: jnp.asarray(reader.get(k)).astype(dt) for k in reader.keys()}
    return cfg, naming.unflatten_names(flat)


def save_checkpoint(cfg: ModelConfig, params, dst: str, hf_config: dict | None = None, tokenizer_dir: str | None = None,
                    overwrite: bool = False):
    """Write params (any arrays) as a dlmjax checkpoint; config.json is `hf_config` or generated from `cfg`."""
    flat = naming.flatten_names(params)
    dt_name = cfg.param_dtype
    dt = np_dtype(dt_name)
    with atomic_dir(dst, overwrite) as tmp:
        specs = our_specs(cfg, dt)
        if set(flat) != {k for k, _, _ in specs}:
            raise CheckpointError(f"save_checkpoint: params have keys {sorted(flat)}, config needs "
                                  f"{sorted(k for k, _, _ in specs)}")
        w = StreamingWriter(os.path.join(tmp, PARAMS_FILE), specs, {"format": "dlmjax"})
        for name, _, shape in specs:
            x = np.asarray(flat[name]).astype(dt)
            if x.shape != shape:
                raise CheckpointError(f"save_checkpoint: param {name!r} has shape {x.shape}, config implies {shape}")
            w.write(name, x)
        w.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_config(cfg, hf_config, torch_dtype=dt_name), f, indent=2)
        with open(os.path.join(tmp, "dlmjax.json"), "w") as f:
            json.dump({**FORMAT, "family": cfg.family, "dtype": dt_name}, f, indent=2)
        _copy_tokenizer(tokenizer_dir, tmp)


# --------------------------------------------------------------------------------------------------------------
# Export


def _plan_shards(items: list[tuple[str, np.dtype, tuple]], max_shard_bytes: int):
    shards, cur, size = [], [], 0
    for it in items:
        n = data_size_bytes([it])
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        shards.append(cur)
    return shards


def export_hf(src: str, dst: str, dtype: str = "auto", max_shard_size: str | int = "5GB", overwrite: bool = False):
    """dlmjax checkpoint -> HF layout (config.json in the family's keys + safetensors, sharded above the size)."""
    cfg, raw = read_checkpoint_config(src)
    reader = _checked_reader(src, cfg)
    out_dt = np_dtype(cfg.param_dtype if dtype == "auto" else dtype)
    entries = naming.table(cfg)
    items, source = [], {}
    for e in entries:
        shape = reader.shapes[e.ours]
        if e.per_layer:
            for i in range(cfg.num_layers):
                k = e.hf.format(i=i)
                items.append((k, out_dt, naming.hf_shape(e, shape[1:])))
                source[k] = (e, i)
        else:
            items.append((e.hf, out_dt, naming.hf_shape(e, shape)))
            source[e.hf] = (e, None)
    shards = _plan_shards(items, parse_size(max_shard_size))
    with atomic_dir(dst, overwrite) as tmp:
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))])
        weight_map = {}
        for fn, shard in zip(names, shards):
            w = StreamingWriter(os.path.join(tmp, fn), shard, {"format": "pt"})
            for k, _, _ in shard:
                e, i = source[k]
                w.write(k, naming.to_hf(e, reader.get(e.ours, i)).astype(out_dt))
                weight_map[k] = fn
            w.close()
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": data_size_bytes(items)}, "weight_map": weight_map}, f,
                          indent=2)
        dt_name = dtype_name(out_dt)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_config(cfg, raw, torch_dtype=dt_name), f, indent=2)
        _copy_tokenizer(src, tmp)


def parse_size(s: str | int) -> int:
    """'5GB' / '500MB' / '100KB' / plain bytes -> bytes."""
    if isinstance(s, int):
        return s
    t = s.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise CheckpointError(f"cannot parse size {s!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)") from None


def inspect(path: str) -> str:
    """A config summary and tensor table of a dlmjax or HF checkpoint directory."""
    lines = []
    if os.path.exists(os.path.join(path, "dlmjax.json")):
        cfg, _ = read_checkpoint_config(path)
        reader = _checked_reader(path, cfg)
        kind = "dlmjax checkpoint"
    else:
        cfg = from_hf_config(_read_json(os.path.join(path, "config.json")), source=os.path.join(path, "config.json"))
        reader = TensorReader(path)
        kind = "HF checkpoint"
    lines.append(f"{path}: {kind}, family {cfg.family}")
    for k, v in cfg.to_dict().items():
        lines.append(f"  {k:26s} {v}")
    total = 0
    lines.append(f"  {'tensor':58s} {'dtype':6s} shape")
    for k in reader.keys():
        n = int(np.prod(reader.shapes[k], dtype=np.int64))
        total += n
        lines.append(f"  {k:58s} {reader.dtypes[k]:6s} {list(reader.shapes[k])}")
    lines.append(f"  {len(reader.keys())} tensors, {total:,} parameters")
    return "\n".join(lines)


__all__ = ["import_hf", "export_hf", "load_checkpoint", "save_checkpoint", "inspect", "CheckpointError",
           "ConfigError", "atomic_dir", "NP_TO_ST"]
