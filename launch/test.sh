#!/usr/bin/env bash
# The whole test suite, with its own set-up: creates/reuses .venv (launch/env.sh), then runs pytest.
# Two workers, one test file per worker at a time (--dist loadfile: a file's session fixtures and the real-weight
# cache are never shared between processes); the long training tests overlap with the rest on a 2-core machine.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k parity`, or `-n 0` for one process).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -q -n "${DLMJAX_TEST_WORKERS:-2}" --dist loadfile "$@"
