#!/usr/bin/env bash
# The whole test suite: every notebook top to bottom (nbdev-test), then the integration tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
echo "== notebooks (nbdev-test)"
nbdev-test --timing
echo "== integration tests (pytest)"
python -m pytest -q tests "$@"
echo "== all tests passed in $((SECONDS - start)) s"
