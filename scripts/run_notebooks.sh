#!/usr/bin/env bash
# Execute notebooks in place so that their outputs (tables, figures) are committed with them, then clean metadata.
#   bash scripts/run_notebooks.sh                  # every notebook
#   bash scripts/run_notebooks.sh nbs/07_viz.ipynb # some
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=module://matplotlib_inline.backend_inline PYTHONWARNINGS=ignore
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(nbs/*.ipynb)
for notebook in "${notebooks[@]}"; do
  start=$SECONDS
  (cd "$(dirname "$notebook")" && jupyter nbconvert --to notebook --execute --inplace --log-level WARN \
      --ExecutePreprocessor.timeout=600 "$(basename "$notebook")")
  echo "$notebook: $((SECONDS - start)) s"
done
nbdev-clean
