"""The test subsets as pytest.ini defines them, on a suite whose markers are known: the default run is
every test not marked slow or compile, `-m slow` the slow ones (the slurm ones among them), `-m compile`
the compiled path."""
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
