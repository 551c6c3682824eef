#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment of ccfm.yaml (`snakemake --sdm conda`):
# scGPT without its ancient pinned dependencies, then this repository's `ccfm` package (editable,
# its dependencies already come from ccfm.yaml).
set -euo pipefail
repository="$(cd "$(dirname "$0")/.." && pwd)"
python -m pip install --no-deps "scgpt==0.2.4"
python -m pip install --no-deps --no-build-isolation -e "$repository"
