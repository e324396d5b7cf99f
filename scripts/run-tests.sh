#!/bin/bash
# Prepare the machine (scripts/setup-test-env.sh), then run the test suite.
#
# Without arguments: the whole suite with the compiled core (when it built),
# then the daemon-level tiers and the guest conformance module again in
# pure-Python mode (VIRTIOFSD_PY_PUREPYTHON=1), so both cores are held to
# the same tests.  Arguments go to one pytest run as they are, e.g.
#   scripts/run-tests.sh -m "not guest"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-test-env.sh
if [ $# -gt 0 ]; then
    exec python3 -m pytest -rs -q "$@"
fi
python3 -c 'from virtiofsd_py.host import native; import virtiofsd_py.app.daemon; print("core:", native.describe())'
python3 -m pytest -rs -q
echo "== again with the pure-Python core (VIRTIOFSD_PY_PUREPYTHON=1)"
VIRTIOFSD_PY_PUREPYTHON=1 python3 -m pytest -rs -q -m "not packaging" \
    tests/unit tests/daemon tests/migration tests/confine tests/guest/test_conformance.py
