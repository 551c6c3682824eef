#!/usr/bin/env bash
# GPU check: the pipeline's GPU path tested and timed in one command (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--device auto|cuda|cpu] [--skip-tests] ...
#
# On a CUDA machine it runs the gpu-marked tests and times training (fp32 and bf16), scGPT
# extraction (feature cache cold and warm) and two-stage generation at the schema's default sizes
# with a whole-human-sized random scGPT, then writes gpu_check.json and gpu_check.md to --out
# (default benchmarks/results). Without CUDA the same code runs on the CPU at tiny sizes in well
# under two minutes and the files say that no GPU was found. Exit status 0 only if every check passed.
# Every option is passed to gpu_check.py (`--help` lists them); CCFM_COMMIT=<sha> records the
# commit where the checkout has no git metadata (a copied working tree).
#
# Which Python: $PYTHON if set, else ./.venv/bin/python if present (`make env`), else python3.
#
# Environment set-up, only when `import ccfm` (from ./workflow) and its imports fail with that Python:
#   1. wheels in ./.whl (git-ignored; made by `bash benchmarks/gpu_check.sh --fetch-wheels` on a
#      machine with internet) are installed with `pip install --no-index --no-deps --target
#      $CCFM_SITE` (default /tmp/ccfm-site) and put on PYTHONPATH: the packages the check imports
#      that a CUDA image with PyTorch usually lacks (anndata and its zarr stack, jsonschema and
#      its referencing stack, scgpt 0.2.4). Nothing is downloaded.
#   2. otherwise a virtual environment $CCFM_GPU_VENV (default ./.venv-gpu) is created with
#      --system-site-packages, so the machine's own CUDA build of torch is used, and filled with
#      `pip install -e .` and `pip install --no-deps scgpt==0.2.4` (needs a package registry).
#
# A lent device machine of this project's workplace (the device tool: one H200, PyTorch 2.11 +
# CUDA 13 under python3, no registry reachable, the repository copied without .git) takes path 1.
# Prepare here, once:   bash benchmarks/gpu_check.sh --fetch-wheels
# then run there with carry [".whl"] and a timeout_s of 600 (the check itself takes a few minutes):
#   CCFM_COMMIT=<the commit> PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh --out "$OUT" 2>&1 | tee "$OUT/log"
# and copy gpu_check.json / gpu_check.md from the returned files into benchmarks/results/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The wheels a PyTorch CUDA image lacks (versions of the development environment that the
# check passes with). Python 3.12, manylinux x86_64, as on the device machine. Checked by running
# the CPU mode (--skip-tests) with only the packages KINDS.md lists for that image plus these.
WHEELS=(
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3
  session-info2==0.4.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  scgpt==0.2.4
)

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="python3"
fi

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  platforms=()
  for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  echo "wheels in $ROOT/.whl ($(du -sh .whl | cut -f1)); carry \".whl\" to the GPU machine"
  exit 0
fi

export PYTHONPATH="$ROOT/workflow${PYTHONPATH:+:$PYTHONPATH}"
# Quick: the packages a PyTorch image tends to lack, and this checkout's ccfm (scgpt located, not imported).
CHECK='import importlib.util, anndata, jsonschema, torch, torchdiffeq, yaml, ccfm
assert importlib.util.find_spec("scgpt") is not None, "scgpt is not installed"'

ready() { "$PY" -c "$CHECK" >/dev/null 2>&1; }

if ! ready; then
  echo "gpu_check.sh: the check's imports fail with $PY; setting up the environment" >&2
  if compgen -G ".whl/*.whl" >/dev/null; then
    SITE="${CCFM_SITE:-/tmp/ccfm-site}"
    echo "gpu_check.sh: installing .whl/*.whl into $SITE (no index, no dependencies)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    VENV="${CCFM_GPU_VENV:-$ROOT/.venv-gpu}"
    echo "gpu_check.sh: creating $VENV (--system-site-packages keeps this machine's torch)" >&2
    "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q -e "$ROOT"
    "$VENV/bin/python" -m pip install -q --no-deps scgpt==0.2.4
    PY="$VENV/bin/python"
  fi
  if ! ready; then
    echo "gpu_check.sh: still cannot import the check's packages with $PY:" >&2
    "$PY" -c "$CHECK" || true
    echo "Fix: install the project (make env, or pip install -e . && pip install --no-deps scgpt==0.2.4)," >&2
    echo "or bring the wheels: bash benchmarks/gpu_check.sh --fetch-wheels where pip can reach PyPI." >&2
    exit 3
  fi
fi

exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
