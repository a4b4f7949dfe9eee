#!/usr/bin/env bash
# Set up a virtual environment (once) and run the whole test suite, in two phases (tests/conftest.py
# says which test goes where): the tests that mostly wait on servers two at a time, then alone the ones
# that keep the cores busy or read the wall clock closely. Arguments go to both phases' pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
phase() {   # pytest's exit status, 5 (no test of this phase selected) counted as success
  local status=0
  KVLAB_TEST_PHASE=$1 .venv/bin/python -m pytest -q "${@:2}" || status=$?
  if [ "$status" -eq 5 ]; then status=0; fi
  return "$status"
}
parallel=0 serial=0
phase parallel -n 2 "$@" || parallel=$?
phase serial "$@" || serial=$?
if [ "$parallel" -ne 0 ]; then exit "$parallel"; fi
exit "$serial"
