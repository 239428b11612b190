"""Conversion CLI: `python -m convert {import,export,inspect} ...` (also installed as `dlmjax-convert`).

Both names run this module's `main`; the `convert` package is installed with dlmjax, so `python -m convert` works
from any directory. Every failure (bad flag, bad input, unwritable or full destination) is one line `error: ...`
on stderr with exit status 2, and nothing is left at --dst; the help is printed only for --help.
"""

from __future__ import annotations

import argparse
import os
import sys

from dlmjax.config import FAMILIES, ConfigError

_EPILOG = """examples:
  python -m convert import --src /ckpt/LLaDA-8B-Instruct --dst /ckpt/llada-dlmjax
  python -m convert import --src SmolLM2-135M-Instruct.Q4_1.gguf --dst /ckpt/smollm2 --dtype float32
  python -m convert export --src /ckpt/llada-dlmjax --dst /ckpt/llada-hf --max-shard-size 5GB
  python -m convert inspect /ckpt/llada-dlmjax
"""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (`error: <prog>: <message> (see <prog> --help)`), exit status 2,
    instead of the usage block; subcommand parsers inherit it."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _shard_size(s: str) -> str:
    """--max-shard-size checked while parsing, so a bad value is named as the flag before any work."""
    from dlmjax.checkpoint.st_io import CheckpointError
    from dlmjax.checkpoint.convert import parse_size

    try:
        parse_size(s)
    except CheckpointError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive size (e.g. 5GB, 500MB, 2GiB or a byte count)")
    return s


def _prog() -> str:
    return "dlmjax-convert" if os.path.basename(sys.argv[0] or "") == "dlmjax-convert" else "python -m convert"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_prog(), description=__doc__, epilog=_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{import,export,inspect}")

    imp = sub.add_parser("import", help="HF checkpoint (or .gguf) -> dlmjax checkpoint",
                         description="Convert a released checkpoint into a dlmjax checkpoint. Every tensor name and "
                                     "shape is checked against config.json before anything is written; on any "
                                     "error nothing is left at --dst.")
    imp.add_argument("--src", required=True,
                     help="HF checkpoint directory (config.json + model.safetensors or a sharded "
                          "model.safetensors.index.json), or a .gguf file (needs the torch extra)")
    imp.add_argument("--dst", required=True, help="output directory for the dlmjax checkpoint (must not exist "
                                                  "unless --overwrite)")
    imp.add_argument("--family", default="auto", choices=("auto",) + FAMILIES,
                     help="model family; auto reads config.json's model_type (llada, Dream, sdar, llama, qwen2, "
                          "qwen3). Default: auto")
    imp.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="dtype of the stored params; auto keeps the source dtype. Default: auto")
    imp.add_argument("--overwrite", action="store_true", help="replace --dst if it exists (atomically)")

    exp = sub.add_parser("export", help="dlmjax checkpoint -> HF checkpoint",
                         description="Write config.json (the family's own keys) + safetensors that transformers "
                                     "(or the family's remote code) loads. Same name table as import, read backwards.")
    exp.add_argument("--src", required=True, help="dlmjax checkpoint directory")
    exp.add_argument("--dst", required=True, help="output HF directory (must not exist unless --overwrite)")
    exp.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="dtype of the written tensors; auto keeps the checkpoint's dtype. Default: auto")
    exp.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                     help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB; above it the export is sharded with "
                          "model.safetensors.index.json. Default: 5GB")
    exp.add_argument("--overwrite", action="store_true", help="replace --dst if it exists (atomically)")

    ins = sub.add_parser("inspect", help="print the config and the tensor table of a checkpoint",
                         description="Print the parsed ModelConfig and every tensor (name, dtype, shape) of a "
                                     "dlmjax or HF checkpoint directory.")
    ins.add_argument("path", help="dlmjax or HF checkpoint directory")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dlmjax.checkpoint import CheckpointError, export_hf, import_hf, inspect

    try:
        if args.cmd == "import":
            cfg = import_hf(args.src, args.dst, args.family, args.dtype, args.overwrite)
            print(f"imported {cfg.family} ({cfg.num_layers} layers, d={cfg.hidden_size}, {cfg.param_dtype}) "
                  f"-> {args.dst}")
        elif args.cmd == "export":
            export_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite)
            print(f"exported {args.src} -> {args.dst}")
        else:
            print(inspect(args.path))
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # at write time (disk full, device gone): atomic_dir already removed the partial output
        dst = getattr(args, "dst", None)
        what = f" ({e.filename})" if e.filename else ""
        if dst:
            print(f"error: {dst}: cannot write{what}: {e.strerror or e}; nothing was left at {dst}", file=sys.stderr)
        else:
            print(f"error: {e.filename or args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
