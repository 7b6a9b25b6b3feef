"""scripts/gpu_check.sh: on a CPU it refuses to run the GPU checks, and --tiny --compile adds the compiled
trainer against the eager one (the rest of --tiny runs inside scripts/paper_scale.sh --tiny, in
test_paper_scale.py)."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import load_script
from errors import UserError

REPO = Path(__file__).resolve().parents[1]


def script():
    return load_script("scripts/gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_the_check_asks_for_tiny():
    module = script()
    with pytest.raises(UserError, match="no CUDA GPU here; scripts/gpu_check.sh --tiny runs the checks"):
        module.main(module.parse_args([]))


def test_a_line_names_the_verdict_the_check_and_the_peak_memory():
    result = script().Result("resume", True, "bit-identical", peak=1.234)
    assert result.line() == "PASS resume    bit-identical [peak GPU memory 1.23 GiB]"
    assert script().Result("compile", None, "left out").line() == "SKIP compile   left out"
    assert script()._peak(["epoch 1\ndone: 2 epochs (3 s this session; peak GPU memory 0.50 GiB)",
                           "peak GPU memory 0.75 GiB"]) == 0.75


@pytest.mark.compile
def test_the_tiny_check_with_compile_compares_the_compiled_trainer_with_the_eager_one(tmp_path):
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--tiny", "--compile", "--only", "compile",
                           "--work", str(tmp_path)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("PASS compile "))
    assert "train loss eager vs compiled: " in line and "tolerance 0.02" in line
    assert done.stdout.splitlines()[-1].startswith("gpu_check: 1 passed, 0 failed, 5 left out, in ")
