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
