#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment of state.yaml: the same installs as ccfm.yaml's.
set -euo pipefail
bash "$(dirname "$0")/ccfm.post-deploy.sh"
