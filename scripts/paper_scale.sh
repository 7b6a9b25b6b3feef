#!/usr/bin/env bash
# The paper's CIFAR-10 / ResNet-18 protocol on one GPU in one command, trained and measured by a deadline:
#
#   scripts/paper_scale.sh --prepare        # here, once: CIFAR-10's zip and unpacker into .gpu/ (git-ignored)
#   scripts/paper_scale.sh                  # on the GPU machine, .gpu carried: everything packed into $OUT by 540 s
#   scripts/paper_scale.sh --tiny           # the same command on the CPU: synthetic data, a tiny network
#
# scripts/paper_scale.py does the work; `scripts/paper_scale.sh --help` lists the flags, docs/paper_scale.md
# says what it runs and writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PAPER_SCALE_ENTRY=scripts/paper_scale.sh exec "${PYTHON:-python3}" scripts/paper_scale.py "$@"
