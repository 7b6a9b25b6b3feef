"""Test-wide settings: one torch thread, since two threads on two loaded cores can be 100x slower; what several
test files share (`from conftest import ...`): the tiny runs' flags, running a script in its own process or
validate_nc.py in this one, and the check of a one-line refusal; and a time limit per test."""
import faulthandler
import importlib.util
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)

import train  # noqa: E402  (found once the repository is on the path)
import validate_nc  # noqa: E402
# The packages the design builds on; pytest runs the tests. requirements.txt's others are optional.
DESIGN_PACKAGES = {"torch", "torchvision", "numpy", "scipy", "matplotlib", "tqdm", "pillow", "pytest"}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # a script's environment


def tiny_flags(epochs: int = 2, checkpoints: int | None = None, per_class: int = 20, *extra: str) -> list[str]:
    """train.py's flags of a tiny run on the CPU: synthetic data, width 4, `per_class` images per class, `epochs`
    epochs and `checkpoints` analysis checkpoints (default: one per epoch), then `extra`."""
    return ["--dataset", "synthetic", "--width", "4", "--epochs", str(epochs), "--num-checkpoints",
            str(checkpoints or epochs), "--samples-per-class", str(per_class), "--device", "cpu", *extra]


def command(*args: str, cwd: Path = REPO, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """A script run in its own process with one thread; `file_size_limit` caps the bytes any file may grow to, so
    that a write past it fails in the kernel as on a full disk (with EFBIG instead of ENOSPC)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ONE_THREAD, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit if file_size_limit is not None else None)


def start(*args: str) -> subprocess.Popen:
    """`command` without waiting: a script (a path in the repository) in its own process with one thread, its
    stderr piped."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ONE_THREAD, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def load_script(path: str) -> ModuleType:
    """A script under scripts/ (not a package) imported as a module, as its tests call its functions."""
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_script", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_seconds(rows: list[dict]) -> list[dict]:
    """log.csv's rows without their `seconds`, the one column that differs between equal runs."""
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single line a refused command printed; the command must have exited 2 without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def validate(run_dir: Path, *flags: str) -> int:
    """validate_nc.py in this process on the CPU, its figures in plots/ beside the run folder."""
    return validate_nc.main(validate_nc.parse_args(["--run-dir", str(run_dir), "--device", "cpu", "--plots-dir",
                                                    str(Path(run_dir).parent / "plots"), *flags]))


@pytest.fixture(name="optional_packages")
def optional_packages_fixture() -> list[str]:
    """The import names of requirements.txt's packages beyond the design's."""
    return optional_packages()


def optional_packages() -> list[str]:
    """The import names of requirements.txt's packages beyond the design's (each imports as it is named)."""
    names = [re.split(r"[=<>~!\[; ]", line.strip(), maxsplit=1)[0].lower()
             for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip() and line[0] != "#"]
    return [name.replace("-", "_") for name in names if name not in DESIGN_PACKAGES]


@pytest.fixture
def design_packages_only(tmp_path_factory) -> dict[str, str]:
    """An environment for subprocesses (and theirs) in which only the design's packages import: a
    sitecustomize on PYTHONPATH makes every optional package's import fail as a missing one's does."""
    folder = tmp_path_factory.mktemp("design-packages-only")
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.modules.update(dict.fromkeys({optional_packages()!r}))\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """A run of train.py with `tiny_flags(3)`, trained once for the whole test run: tests read it and never
    change it (one that would, copies it first)."""
    run_dir = tmp_path_factory.mktemp("tiny-trained") / "run"
    assert train.main(train.parse_args([*tiny_flags(3), "--run-dir", str(run_dir)])) == 0
    return run_dir


# ---------------------------------------------------------------- a time limit per test
# A test that hangs (a subprocess that never answers, a follower waiting for a trainer that is gone) fails
# once it has run past its limit, at the line it had reached, and the suite goes on. pytest.ini sets the
# limits (time_limit; slow_time_limit for tests marked slow or compile); @pytest.mark.time_limit(S) sets one
# test's, 0 for none. The alarm (SIGALRM) interrupts Python code; a hang inside C code that never returns to
# Python cannot be interrupted, so faulthandler ends the whole run HARD_STOP_S later, with every thread's stack.
HARD_STOP_S = 60
STDERR = pytest.StashKey[int]()  # the terminal's stderr (a descriptor), which pytest's capture of tests leaves alone


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("time_limit", "seconds a test may run, setup and teardown included (0: no limit)", default="300")
    parser.addini("slow_time_limit", "seconds a test marked slow or compile may run (0: no limit)", default="1200")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "time_limit(seconds): this test's own time limit (0: none)")
    config.stash[STDERR] = os.dup(2)  # before any test's output is captured; open while the process lives


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    limit = _time_limit(item)
    if not limit or threading.current_thread() is not threading.main_thread():  # which alone gets signals
        yield
        return

    def out_of_time(signum: int, frame) -> None:
        pytest.fail(f"{item.nodeid} ran past its time limit of {limit:g} s (pytest.ini's time_limit or "
                    "slow_time_limit, or its time_limit marker) and was stopped where the traceback shows")

    began = time.monotonic()
    handler = signal.signal(signal.SIGALRM, out_of_time)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, limit)
    stderr = item.config.stash[STDERR]
    faulthandler.dump_traceback_later(limit + HARD_STOP_S, exit=True, file=stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, handler)
        if outer:  # this test ran inside another (pytester's): the other's alarm again, less the time spent here
            left = max(outer - (time.monotonic() - began), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left)
            faulthandler.dump_traceback_later(left + HARD_STOP_S, exit=True, file=stderr)


def _time_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("time_limit")
    if marker is not None:
        return float(marker.args[0])
    slow = item.get_closest_marker("slow") or item.get_closest_marker("compile")
    return float(item.config.getini("slow_time_limit" if slow else "time_limit"))
