#!/bin/bash
# Prepare the machine (scripts/setup-test-env.sh), then run the test suite.
# Arguments go to pytest, e.g.: scripts/run-tests.sh -m "not guest"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-test-env.sh
exec python3 -m pytest -rs -q "$@"
