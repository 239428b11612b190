#!/usr/bin/env bash
# The whole test suite, with its own set-up: creates/reuses .venv (launch/env.sh), then runs pytest.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k parity`).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q "$@"
