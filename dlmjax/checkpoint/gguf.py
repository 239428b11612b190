"""GGUF -> HF safetensors through transformers' own GGUF loader (needs the `torch` extra: torch, gguf, accelerate).

Quantised tensors are dequantised to float32 by transformers; we save them as float32 so nothing is rounded twice.
"""

from __future__ import annotations

import os

from dlmjax.checkpoint.st_io import CheckpointError


def gguf_to_hf(gguf_path: str, out_dir: str, dtype: str = "float32"):
    """Write `out_dir` with config.json, model.safetensors and the tokenizer files of a GGUF file."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise CheckpointError(f"{gguf_path}: reading GGUF needs the torch extra (pip install 'dlmjax[torch]'): {e}")
    if not os.path.isfile(gguf_path):
        raise CheckpointError(f"{gguf_path}: file not found")
    d, name = os.path.split(os.path.abspath(gguf_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=getattr(torch, dtype))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    except Exception as e:
        raise CheckpointError(f"{gguf_path}: transformers could not read this GGUF file ({type(e).__name__}: {e})")
    # The weights are already dequantised; drop the GGUF "quantizer" so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
