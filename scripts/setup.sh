#!/usr/bin/env bash
# Set up this checkout on a fresh machine: a virtual environment in .venv with the project installed.
#   bash scripts/setup.sh          runtime only (enough for `mnist-kmeans run`)
#   bash scripts/setup.sh --test   also the test extra, Debian's chromium for the report's browser test and slurm-wlm
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if [ "${1:-}" = "--test" ]; then
  extra="[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium (the report is checked in a real headless browser)" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  fi
  if ! command -v slurmctld >/dev/null 2>&1; then
    echo "setup: installing Debian's slurm-wlm (tests/test_slurm.py starts a single-node SLURM with it)" >&2
    bash scripts/slurm.sh install
  fi
fi
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extra}"
