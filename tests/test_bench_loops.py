"""The loop benchmarks in bench/ run end to end in their --quick mode and print their one summary line.

bench/ is not a package, so each script is loaded from its path, under a name that cannot shadow the
repository's own train.py. No timing is asserted: the numbers depend on the machine and its load.
"""
import importlib.util
import re
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"
SECONDS = r"\d[\d.]* s"
RATIO = r"\d+\.\d\dx"


def test_train_bench_prints_the_epoch_ratios(capsys):
    line = _summary(_load("train"), capsys)
    assert line.startswith("train epoch (synthetic, resnet18 width 4, 100 train + 500 test images, batch 128, ")
    assert re.search(rf"train_epoch {SECONDS} vs bare {SECONDS} \({RATIO}, target <= 1\.10x\)", line), line
    assert re.search(rf"with evaluate {SECONDS} vs bare {SECONDS} \({RATIO}\)", line), line
    assert re.search(rf"DataLoader\(ToTensor, Normalize\), 0 workers {SECONDS} \({RATIO} bare train\)", line), line


def test_epoch_bench_prints_train_py_against_the_bare_step(capsys):
    line = _summary(_load("epoch"), capsys)
    assert line.startswith("train.py epoch (synthetic, resnet18 width 4, 100 train + 500 test images, batch 128, "
                           "fp32, eager (torch.compile takes ~45 s per graph on a CPU; --compile), medians of 2 bare "
                           "epochs and of 2 + 1 of train.py's 4, cpu, 1 thread(s)): ")
    assert re.search(rf"{SECONDS} without a checkpoint \({RATIO}\), {SECONDS} with its evaluation and files "
                     rf"\({RATIO}\) vs the bare step {SECONDS}; over the protocol's 350 epochs with 50 checkpoints "
                     rf"{SECONDS} \({RATIO}, target <= 1\.20x\)$", line), line


def test_validate_bench_prints_the_checkpoint_ratio(capsys):
    line = _summary(_load("validate"), capsys)
    assert line.startswith("checkpoint measurement (synthetic, resnet18 width 4, 100 train + 500 test images, "
                           "batch 1000, strict fp32, median of 1, cpu")
    assert re.search(rf"measure_collapse {SECONDS} vs bare forward {SECONDS} \({RATIO}, target <= 1\.15x\); "
                     rf"with --layers --test-collapse {SECONDS} \({RATIO} the plain measurement, target <= 1\.30x\)$",
                     line), line


def test_checkpoint_bench_prints_the_write_and_load_ratios(capsys):
    line = _summary(_load("checkpoints"), capsys)
    assert re.fullmatch(rf"last\.pt \(resnet18 width 4, [\d.]+ MiB, median of 1, cpu\): save_checkpoint {SECONDS} vs "
                        rf"torch\.save and rename {SECONDS} \({RATIO}; torch\.save alone {SECONDS}, without its CRCs "
                        rf"{SECONDS}\); load_checkpoint {SECONDS} vs torch\.load {SECONDS} \({RATIO}\); on the "
                        rf"background thread a write took {SECONDS} and cost a launch-bound training thread {SECONDS}",
                        line), line


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}_script", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(script: ModuleType, capsys) -> str:
    """The one line the script prints with --quick, after checking that it exits with 0."""
    assert script.main(script.parse_args(["--quick"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return lines[0]
