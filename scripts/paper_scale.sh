#!/usr/bin/env bash
# The paper's CIFAR-10 / ResNet-18 protocol on one GPU, checked, trained and measured by a deadline:
#
#   scripts/paper_scale.sh --prepare        # here, once: CIFAR-10's zip and unpacker into .gpu/ (git-ignored)
#   scripts/paper_scale.sh                  # on the GPU machine, .gpu carried: everything packed into $OUT by 540 s
#   scripts/paper_scale.sh --resume         # on the same machine, if the first did not finish: it continues
#   scripts/paper_scale.sh --tiny           # the same command on the CPU: synthetic data, a tiny network
#
# scripts/paper_scale.py does the work; `scripts/paper_scale.sh --help` lists the flags, docs/paper_scale.md
# says what it runs and writes. The deadline counts from this moment.
set -euo pipefail
export PAPER_SCALE_STARTED="${PAPER_SCALE_STARTED:-$(date +%s.%N)}"
cd "$(dirname "$0")/.."
PAPER_SCALE_ENTRY=scripts/paper_scale.sh exec "${PYTHON:-python3}" scripts/paper_scale.py "$@"
