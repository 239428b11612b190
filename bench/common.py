"""Shared helpers of the benchmarks: timing, machine description, markdown tables.

Timings are wall-clock medians (time.perf_counter). JAX calls are timed up to `block_until_ready` of every output
leaf, so the asynchronous dispatch is not mistaken for the compute.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

# Every benchmark imports this module before transformers: offline, and no progress/config warnings in the tables.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def block(x):
    """Wait for every JAX array in the pytree `x`; other leaves are left alone. Returns x."""
    import jax

    for leaf in jax.tree.leaves(x):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return x


def timed(fn, *args):
    """(seconds, result) of one call of fn(*args), JAX outputs blocked on."""
    t0 = time.perf_counter()
    out = block(fn(*args))
    return time.perf_counter() - t0, out


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Versions, devices and threads of both frameworks (torch imported lazily, only if already importable)."""
    import jax

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A right-aligned markdown table; floats get two decimals (pre-format cells as strings for anything else)."""
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(c) for c in cells])


def csv_list(kind=str, choices=None):
    """argparse type: a comma-separated list of `kind` values, each one of `choices` when given."""

    def parse(s: str) -> list:
        out = [kind(x) for x in s.split(",") if x]
        for x in out:
            if choices is not None and x not in choices:
                raise argparse.ArgumentTypeError(f"{x!r} is not one of {choices}")
        return out

    return parse


def write_llada_hf(dst: str, state_dict: dict, llama_config, geometry: dict, mask_id: int, tie: bool):
    """A torch Llama state dict saved as a released-layout LLaDA checkpoint (LLaDA key names + LLaDA config.json),
    so `import_hf` reads it as family llada; the benchmarks' way to give both sides the same weights."""
    import json

    from safetensors.torch import save_file

    from tests.reference import hf_models as R

    raw = R.llada_config(llama_config, tie=tie)
    raw.update(rope_theta=geometry["rope_theta"], max_sequence_length=geometry["max_position_embeddings"],
               mask_token_id=mask_id, eos_token_id=geometry["eos_token_id"], pad_token_id=geometry["eos_token_id"])
    os.makedirs(dst)
    save_file(R.to_llada_names(state_dict, llama_config.num_hidden_layers), os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)


def markdown_tables(text: str) -> list[list[dict]]:
    """Every markdown table printed in `text`, as a list of {header: cell} rows (the smoke tests read them back)."""
    import re

    tables, cur = [], []
    for ln in text.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            header = [c.strip() for c in cur[0].strip("|").split("|")]
            if not re.fullmatch(r"\|[-:|]+\|", cur[1]):
                raise ValueError(f"not a markdown table separator: {cur[1]!r}")
            tables.append([dict(zip(header, (c.strip() for c in r.strip("|").split("|")))) for r in cur[2:]])
            cur = []
    return tables
