#!/usr/bin/env bash
# The prepared GPU check (issue 21): every CUDA path of training, evaluation and prediction, and the throughput figures,
# in one command of about 8 minutes on one H200. What it runs and measures: benchmarks/gpu_check.py's docstring.
#   bash scripts/gpu_check.sh                        # on a GPU machine: results in $OUT (else workspace/gpu_check)
#   bash scripts/gpu_check.sh --dry-run --out DIR    # on any CPU machine: the same code, tiny sizes (CI runs it)
# Arguments go to benchmarks/gpu_check.py (--out, --stages, --budget, --presets, --dry-run).
#
# A GPU machine without network: the packages its image lacks travel as wheels in .whl/ (scripts/gpu_wheels.sh makes
# it; the device run carries it). When they are not importable here they are installed from .whl/ only, into a folder
# outside the checkout, and the checkout itself is put on PYTHONPATH (no `pip install -e`). MLflow stays off, and no
# widget or notebook package is imported on the checked paths.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import fastcore, pydantic, omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: fastcore, pydantic or omegaconf is missing and there is no .whl/ folder to install them from;" \
         "run scripts/gpu_wheels.sh where PyPI is reachable and carry .whl with the checkout" >&2
    exit 1
  fi
  site="${TMPDIR:-/tmp}/stereo_kit_gpu_check_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON" benchmarks/gpu_check.py "$@"
