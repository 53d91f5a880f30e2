#!/usr/bin/env bash
# Execute notebooks in place so that their outputs (tables, figures) are committed with them, then clean metadata.
#   bash scripts/run_notebooks.sh                  # every notebook
#   bash scripts/run_notebooks.sh nbs/05a_viz.ipynb # some
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=module://matplotlib_inline.backend_inline PYTHONWARNINGS=ignore
# An IPython profile of our own whose startup file makes committed figures compact (scripts/compact_figures.py).
IPYTHONDIR=$(mktemp -d)
export IPYTHONDIR
trap 'rm -rf "$IPYTHONDIR"' EXIT
mkdir -p "$IPYTHONDIR/profile_default/startup"
cp scripts/compact_figures.py "$IPYTHONDIR/profile_default/startup/00-compact_figures.py"
notebooks=("$@")
[ ${#notebooks[@]} -gt 0 ] || notebooks=(nbs/*.ipynb)
for notebook in "${notebooks[@]}"; do
  start=$SECONDS
  (cd "$(dirname "$notebook")" && jupyter nbconvert --to notebook --execute --inplace --log-level WARN \
      --ExecutePreprocessor.timeout=600 "$(basename "$notebook")")
  nbdev-clean --fname "$notebook"          # only the notebooks run: others may be open in an editor
  echo "$notebook: $((SECONDS - start)) s"
done
