"""HF checkpoints <-> dlmjax checkpoints, streamed one tensor at a time, validated before anything is written.

A dlmjax checkpoint is a directory:
  config.json          the family's own config (LLaDA / Dream / SDAR / Llama / Qwen keys), as released
  dlmjax.json          {"format": "dlmjax", "version": 1, "family": ..., "dtype": ...}
  params.safetensors   flat names of the params pytree ("embed", "layers.wq", ...), layers stacked on axis 0
  tokenizer files      copied from the source (tokenizer.json, tokenizer_config.json, chat template, ...)
  *.py                 the source's remote code (configuration_*.py / modeling_*.py that its auto_map names), so an
                       export loads through the same classes as the source did (see config.IDENTITY_KEYS)
Every write goes to a temporary sibling directory that is renamed into place only when complete. Before any work the
destination is checked (not the source nor inside it, writable, room for the output), so a bad --dst fails at once
and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile

import numpy as np

from dlmjax.config import ConfigError, ModelConfig, detect_family, from_hf_config, param_shapes, to_hf_config
from dlmjax.checkpoint import naming
from dlmjax.checkpoint.st_io import (NP_TO_ST, ST_DTYPES, CheckpointError, StreamingWriter, TensorReader,
                                     data_size_bytes, dtype_name, np_dtype)

FORMAT = {"format": "dlmjax", "version": 1}
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def _inside(path: str, root: str) -> bool:
    """`path` is `root` or below it (both already resolved)."""
    return os.path.commonpath([path, root]) == root


def _existing_ancestor(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_destination(dst: str, overwrite: bool = False, src: str | None = None):
    """Refuse, before any work, a destination that cannot end well: one that exists (without `overwrite`), the
    source itself, one inside the source or holding it (replacing it would destroy the input), or a place we cannot
    create files in (read-only filesystem, no permission, a file where a directory is needed)."""
    real = os.path.realpath(dst)
    if src is not None:
        rsrc = os.path.realpath(src)
        if _inside(real, rsrc):
            raise CheckpointError(f"{dst}: destination is the source {src} or inside it; choose a directory "
                                  "outside the source")
        if _inside(rsrc, real):
            raise CheckpointError(f"{dst}: destination contains the source {src}; replacing it would delete the "
                                  "source; choose another directory")
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists (pass overwrite=True / --overwrite to replace it)")
    anc = _existing_ancestor(os.path.dirname(os.path.abspath(dst)))
    if not os.path.isdir(anc):
        raise CheckpointError(f"{dst}: cannot create it, {anc} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dlmjax-probe-", dir=anc))
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write in {anc} ({e.strerror or e})") from None


def check_free_space(dst: str, need_bytes: int):
    """Refuse a destination whose filesystem has less room than the output needs (before writing any of it)."""
    anc = _existing_ancestor(os.path.dirname(os.path.abspath(dst)))
    try:
        st = os.statvfs(anc)
    except OSError:
        return  # no statvfs here: the write itself reports a full disk
    free = st.f_bavail * st.f_frsize
    if need_bytes > free:
        raise CheckpointError(f"{dst}: needs {need_bytes / 2**20:.2f} MiB but {anc} has only {free / 2**20:.2f} "
                              "MiB free")


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
    """Yield a temporary directory next to `dst`; rename it to `dst` only if the block finishes without error.
    On any error the temporary directory and the parent directories this call created are removed."""
    check_destination(dst, overwrite)
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    created, p = [], parent
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
        yield tmp
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; only directories that are still empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    if os.path.exists(dst):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
        os.rename(dst, os.path.join(trash, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def _read_json(path) -> dict:
    """A JSON object from `path`; every way it can fail is a one-line CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(v, dict):
        kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")
        raise CheckpointError(f"{path}: expected a JSON object (key: value pairs) at the top level, got a JSON {kind}")
    return v


def _uses_remote_code(src_dir: str) -> bool:
    """The directory's config.json has an auto_map (its model loads through the *.py files next to it)."""
    try:
        with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and bool(raw.get("auto_map"))


def _side_files(src_dir: str | None) -> list[str]:
    """Files that travel with the weights: tokenizer files and, for a config with an auto_map, the remote code
    (every top-level *.py: the configuration_*.py / modeling_*.py the auto_map names plus what they import, e.g.
    Dream's generation_utils.py)."""
    if not src_dir or not os.path.isdir(src_dir):
        return []
    out = [os.path.join(src_dir, fn) for fn in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, fn))]
    if _uses_remote_code(src_dir):
        out += sorted(glob.glob(os.path.join(glob.escape(src_dir), "*.py")))
    return out


def _copy_side_files(src_dir: str | None, dst_dir: str):
    for p in _side_files(src_dir):
        shutil.copy2(p, os.path.join(dst_dir, os.path.basename(p)))


def _side_bytes(src_dir: str | None) -> int:
    return sum(os.path.getsize(p) for p in _side_files(src_dir))


def _family_hint(raw: dict, family: str, cfg: ModelConfig) -> str:
    """For an explicit --family that the config's model_type disagrees with: a hint appended to tensor errors."""
    if family == "auto":
        return ""
    try:
        guess = detect_family(raw)
    except ConfigError:
        return ""
    if guess == cfg.family:
        return ""
    return f" (config.json's model_type {raw.get('model_type')!r} suggests --family {guess}, not {cfg.family})"


def our_specs(cfg: ModelConfig, dtype: np.dtype) -> list[tuple[str, np.dtype, tuple]]:
    return [(k, dtype, tuple(s)) for k, s in naming.flatten_names(param_shapes(cfg)).items()]


# --------------------------------------------------------------------------------------------------------------
# Import


def _plan_import(cfg: ModelConfig, reader: TensorReader, hint: str = ""):
    """Check names, count and every shape before reading data. Returns the table. `hint` ends name errors."""
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
                              f"{cfg.num_layers} layers (config/weights mismatch?){hint}")
    for key, shape in expected.items():
        if key not in reader.shapes:
            where = reader.path
            if key == tied_key:
                raise CheckpointError(f"{where}: missing tensor {key!r} (config says tie_word_embeddings=false)")
            raise CheckpointError(f"{where}: missing tensor {key!r}{hint}")
        if reader.shapes[key] != shape:
            raise CheckpointError(f"{reader.files[key]}: tensor {key!r} has shape {list(reader.shapes[key])}, "
                                  f"the config implies {list(shape)}{hint}")
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
    check_destination(dst, overwrite, src)
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
    entries = _plan_import(cfg, reader, _family_hint(raw, family, cfg))
    out_dt = _source_dtype(reader, entries) if dtype == "auto" else np_dtype(dtype)
    dt_name = dtype_name(out_dt)
    if dt_name is None:
        raise CheckpointError(f"{src}: source dtype {out_dt} is not a float type dlmjax stores; pass --dtype")
    by_ours = {e.ours: e for e in entries}
    specs = our_specs(cfg, out_dt)
    check_free_space(dst, data_size_bytes(specs) + _side_bytes(src))
    with atomic_dir(dst, overwrite) as tmp:
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
        _copy_side_files(src, tmp)
    return cfg.replace(param_dtype=dt_name)


# --------------------------------------------------------------------------------------------------------------
# dlmjax checkpoints


def read_checkpoint_config(path: str, **overrides) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the stored config.json) of a dlmjax checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a dlmjax checkpoint made by `convert import`)")
    if not os.path.exists(os.path.join(path, "dlmjax.json")):
        raise CheckpointError(f"{path}: not a dlmjax checkpoint (no dlmjax.json; `convert import` makes one from an "
                              "HF checkpoint)")
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


def _source_config_for(cfg: ModelConfig, src_dir: str | None) -> dict | None:
    """The config.json of dlmjax checkpoint `src_dir` if it describes exactly `cfg`'s model (numerics aside)."""
    if not src_dir or not os.path.isfile(os.path.join(src_dir, "dlmjax.json")):
        return None
    try:
        src_cfg, raw = read_checkpoint_config(src_dir)
    except (CheckpointError, ConfigError):
        return None
    numerics = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, remat=cfg.remat)
    return raw if src_cfg.replace(**numerics) == cfg else None


def save_checkpoint(cfg: ModelConfig, params, dst: str, hf_config: dict | None = None, tokenizer_dir: str | None = None,
                    overwrite: bool = False):
    """Write params (any arrays) as a dlmjax checkpoint. config.json is built from `cfg` on top of `hf_config`, or,
    when that is None and `tokenizer_dir` is the dlmjax checkpoint the model came from (same family and
    architecture, as in training), on top of that checkpoint's config.json: so a fine-tuned model keeps the source's
    identity (model_type / architectures / auto_map) and exports like it; otherwise the family's defaults. The
    tokenizer files and the remote code (*.py) of `tokenizer_dir` are copied."""
    if hf_config is None:
        hf_config = _source_config_for(cfg, tokenizer_dir)
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
        _copy_side_files(tokenizer_dir, tmp)


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
    """dlmjax checkpoint -> HF layout (config.json in the family's keys + safetensors, sharded above the size).
    The config keeps the source's identity keys and the remote code travels, so the export loads like the source."""
    max_bytes = parse_size(max_shard_size)
    check_destination(dst, overwrite, src)
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
    shards = _plan_shards(items, max_bytes)
    check_free_space(dst, data_size_bytes(items) + _side_bytes(src))
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
        _copy_side_files(src, tmp)


def parse_size(s: str | int) -> int:
    """'5GB' / '500MB' / '100KB' / plain bytes -> bytes; a size must be a positive, finite amount (0 or less would
    put every tensor in its own shard)."""
    bad = f"max shard size {s!r}: use a positive size such as 5GB, 500MB, 2GiB or a byte count"
    if isinstance(s, bool):
        raise CheckpointError(bad)
    if isinstance(s, int):
        n = s
    else:
        t = str(s).strip().upper()
        n = None
        for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                           ("KB", 10**3), ("B", 1)):
            if t.endswith(unit):
                t, n = t[: -len(unit)].strip(), mult
                break
        try:
            x = float(t) * (n or 1)
            n = int(x)
        except (ValueError, OverflowError):
            raise CheckpointError(bad) from None
    if n < 1:
        raise CheckpointError(bad)
    return n


def inspect(path: str) -> str:
    """A config summary and tensor table of a dlmjax or HF checkpoint directory."""
    lines = []
    if os.path.exists(os.path.join(path, "dlmjax.json")):
        cfg, _ = read_checkpoint_config(path)
        reader = _checked_reader(path, cfg)
        kind = "dlmjax checkpoint"
    else:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory (expected a dlmjax or HF checkpoint directory)")
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
           "ConfigError", "atomic_dir", "check_destination", "check_free_space", "NP_TO_ST"]
