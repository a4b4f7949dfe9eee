#!/usr/bin/env bash
# Set up a virtual environment (once) and run the whole test suite, in three phases (tests/conftest.py
# says which test goes where): the tests that mostly wait on servers four at a time, the ones that keep a
# core busy two at a time, then alone the ones that read the wall clock closely. Arguments go to every
# phase's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
phase() {   # pytest's exit status, 5 (no test of this phase selected) counted as success
  local status=0
  KVLAB_TEST_PHASE=$1 .venv/bin/python -m pytest -q "${@:2}" || status=$?
  if [ "$status" -eq 5 ]; then status=0; fi
  return "$status"
}
parallel=0 pure=0 serial=0
phase parallel -n 4 "$@" || parallel=$?
phase pure -n 2 --dist worksteal "$@" || pure=$?
phase serial "$@" || serial=$?
if [ "$parallel" -ne 0 ]; then exit "$parallel"; fi
if [ "$pure" -ne 0 ]; then exit "$pure"; fi
exit "$serial"
