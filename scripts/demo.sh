#!/usr/bin/env bash
# The main job end to end on the embedded default cluster: start it, measure its latency-throughput
# curve with Locust, compare with the analytical planner, write the report (reports/default/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvlab sweep default --out reports/default "$@"
