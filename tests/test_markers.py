"""The test subsets as pytest.ini and tests/conftest.py define them, on a suite whose markers are known:
`-m quick` is every test not marked slow, compile or slurm; the default run is all but the compile tests."""
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

@pytest.mark.slurm
def test_slurm(): pass

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
    (["-m", "quick"], ["test_plain", "test_cases[1]"]),
    ([], ["test_plain", "test_slow", "test_slurm", "test_slow_slurm", "test_cases[1]", "test_cases[2]",
          "TestGrouped::test_in_a_slow_class"]),
    (["-m", "compile"], ["test_compile"]),
    (["-m", "slurm"], ["test_slurm", "test_slow_slurm"]),
])
def test_quick_is_what_is_not_slow_compile_or_slurm_and_the_default_all_but_compile(pytester, flags, selected):
    pytester.makeini((REPO / "pytest.ini").read_text())
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("--collect-only", "-q", "--strict-markers", *flags)
    collected = [line.split("::", 1)[1] for line in result.outlines if line.startswith("test_suite.py::")]
    assert collected == selected
