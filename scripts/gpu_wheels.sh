#!/usr/bin/env bash
# Download the wheels the GPU check needs and the device image lacks, for CPython 3.12 on x86-64 Linux, into .whl/
# (ignored by git; the device run carries it). The image already has torch, accelerate, transformers, timm, numpy,
# opencv, click, tqdm, PyYAML and pytest; what stereo_kit imports beside them is below, pinned to versions that satisfy
# pyproject.toml (pydantic-core must be exactly the one pydantic names). omegaconf 2.4 no longer needs antlr.
#   bash scripts/gpu_wheels.sh          # then: scripts/gpu_check.sh installs them with pip --no-index --target
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  fastcore==2.2.41
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  typing-extensions==4.16.0
  omegaconf==2.4.0
)

rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

# pydantic refuses to start with any other pydantic-core than the one it was released with: check the pair here
python3 - <<'EOF'
import re, sys, zipfile
from pathlib import Path
wheels = sorted(Path(".whl").glob("*.whl"))
def metadata(prefix):
    wheel = next(w for w in wheels if w.name.lower().startswith(prefix))
    with zipfile.ZipFile(wheel) as archive:
        return next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
wanted = re.search(r"^Requires-Dist: pydantic-core==([\w.]+)", metadata("pydantic-"), re.M).group(1)
core = next(w.name for w in wheels if w.name.lower().startswith("pydantic_core-"))
if f"-{wanted}-" not in core: sys.exit(f".whl: pydantic needs pydantic-core=={wanted}, downloaded {core}")
if len(wheels) != 7: sys.exit(f".whl: expected 7 wheels, found {len(wheels)}: {[w.name for w in wheels]}")
EOF

ls -l .whl
echo "$(ls .whl | wc -l) wheels, $(du -sk .whl | cut -f1) KiB in .whl/"
