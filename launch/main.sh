#!/usr/bin/env bash
# The main job on its embedded default, with its own set-up (creates/reuses .venv via launch/env.sh).
# The demo: build a small dLLM, SFT it with MDLM on synthetic addition, checkpoint it, evaluate it under three
# decoding rules (accuracy, TPF, expected wrong commits). Extra arguments are absl flags
# (`bash launch/main.sh --helpfull`; `--job=parity` runs the real-weight parity report instead).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m dlmjax.launch --job=demo "$@"
