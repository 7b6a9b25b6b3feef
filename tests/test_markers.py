"""The test subsets as pytest.ini defines them, on a suite whose markers are known: the default run is
every test not marked slow or compile, `-m slow` the slow ones (the slurm ones among them), `-m compile`
the compiled path; and the time limit per test that tests/conftest.py keeps."""
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parents[1]
SUITE = """
import pytest

def test_plain(): pass

@pytest.mark.slow
def test_slow(): pass

@pytest.mark.compile
def test_compile(): pass

@pytest.mark.slow
@pytest.mark.slurm
def test_slow_slurm(): pass

@pytest.mark.parametrize("case", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_cases(case): pass

class TestGrouped:
    pytestmark = pytest.mark.slow
    def test_in_a_slow_class(self): pass
"""


@pytest.mark.parametrize("flags, selected", [
    ([], ["test_plain", "test_cases[1]"]),
    (["-m", "slow"], ["test_slow", "test_slow_slurm", "test_cases[2]", "TestGrouped::test_in_a_slow_class"]),
    (["-m", "compile"], ["test_compile"]),
    (["-m", "slurm"], ["test_slow_slurm"]),
])
def test_the_default_run_leaves_out_the_slow_and_compile_tests_which_their_markers_select(pytester, flags,
                                                                                          selected):
    pytester.makeini((REPO / "pytest.ini").read_text())
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("--collect-only", "-q", "--strict-markers", *flags)
    collected = [line.split("::", 1)[1] for line in result.outlines if line.startswith("test_suite.py::")]
    assert collected == selected


HANGING = """
import time

import pytest


@pytest.mark.time_limit(1)
def test_hangs():
    time.sleep(600)


def test_hangs_under_the_ini_limit():
    time.sleep(600)


def test_after():
    pass
"""


@pytest.mark.parametrize("flags, failed", [([], ["test_hangs"]),
                                           (["-o", "time_limit=1"], ["test_hangs", "test_hangs_under_the_ini_limit"])])
def test_a_test_past_its_time_limit_fails_at_the_line_it_had_reached_and_the_suite_goes_on(pytester, flags, failed):
    pytester.makeini((REPO / "pytest.ini").read_text())
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_suite=HANGING)
    selected = ["-k", "not ini_limit"] if not flags else []  # the ini's own 300 s would stop it, in 300 s
    result = pytester.runpytest("--import-mode=importlib", "-p", "no:cacheprovider", *flags, *selected)
    result.assert_outcomes(passed=1, failed=len(failed))
    for test in failed:
        result.stdout.fnmatch_lines([f"*test_suite.py::{test} ran past its time limit of 1 s*"])
    result.stdout.fnmatch_lines(["*time.sleep(600)*"])  # where it was stopped
