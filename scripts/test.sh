#!/usr/bin/env bash
# The test suite: every notebook top to bottom (nbdev-test), then the integration tests (pytest).
#   bash scripts/test.sh          the quick suite: pytest skips the tests marked `slow` (about 7 minutes on 2 cores)
#   bash scripts/test.sh --all    everything, the slow tests too (training runs, signals, export, browser: what CI runs, ~25 min)
# Further arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
selection=(-m "not slow")
if [ "${1:-}" = "--all" ]; then selection=(); shift; fi
echo "== notebooks (nbdev-test)"
nbdev-test --timing
echo "== integration tests (pytest${selection:+ -m \"not slow\"})"
python -m pytest -q tests ${selection[@]+"${selection[@]}"} "$@"
echo "== all tests passed in $((SECONDS - start)) s"
