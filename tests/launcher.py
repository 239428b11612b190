"""Run `python -m dlmjax.launch ...` in a subprocess from the repo root (CPU backend), as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, timeout=900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "dlmjax.launch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
