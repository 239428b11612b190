"""Conversion CLI: `python -m convert {import,export,inspect} ...` (also installed as `dlmjax-convert`)."""

from __future__ import annotations

import argparse
import sys

from dlmjax.config import FAMILIES, ConfigError

_EPILOG = """examples:
  python -m convert import --src /ckpt/LLaDA-8B-Instruct --dst /ckpt/llada-dlmjax
  python -m convert import --src SmolLM2-135M-Instruct.Q4_1.gguf --dst /ckpt/smollm2 --dtype float32
  python -m convert export --src /ckpt/llada-dlmjax --dst /ckpt/llada-hf --max-shard-size 5GB
  python -m convert inspect /ckpt/llada-dlmjax
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__, epilog=_EPILOG,
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
    exp.add_argument("--max-shard-size", default="5GB",
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
