#!/usr/bin/env bash
# The GPU acceptance check, about a minute on one GPU: resume, compile, bf16, --follow, DeepFool and a torchrun
# start on a small network, one line per check and a summary (exit status 1 if one fails).
#
#   scripts/gpu_check.sh            # on a GPU machine; scripts/paper_scale.sh runs it before training
#   scripts/gpu_check.sh --tiny     # the checks that apply on a CPU
#
# scripts/gpu_check.py does the work; `scripts/gpu_check.sh --help` says what each check compares.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
