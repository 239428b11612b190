"""Checkpoints: HF safetensors <-> dlmjax params (one bidirectional name table per family)."""

from dlmjax.checkpoint.convert import (atomic_dir, export_hf, import_hf, inspect, load_checkpoint, read_checkpoint_config,
                                       save_checkpoint)
from dlmjax.checkpoint.st_io import CheckpointError

__all__ = ["atomic_dir", "export_hf", "import_hf", "inspect", "load_checkpoint", "read_checkpoint_config",
           "save_checkpoint", "CheckpointError"]
