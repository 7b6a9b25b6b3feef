"""bench/metrics.py --quick still runs, prints its fields, and finds ours equal to the notebook baseline."""
import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "metrics.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_metrics", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_prints_its_fields_and_matches_the_baseline(bench, capsys):
    assert bench.main(bench.parse_args(["--quick"])) == 0
    out = capsys.readouterr().out
    metrics = re.search(r"^metrics d=32 C=4 N=600: ours \S+ s on cpu, baseline \S+ s -> \d+x faster; "
                        r"max rel diff (\S+)$", out, re.MULTILINE)
    assert metrics, out
    assert float(metrics.group(1)) <= 1e-9
    assert re.search(r"^FeatureStats memory d=32 C=4 .*: N=600 tensors \S+ MB, peak RSS growth \S+ MB; "
                     r"N=2400 tensors \S+ MB, peak RSS growth \S+ MB; ratio \S+$", out, re.MULTILINE), out
    assert re.search(r"^summary: \d+x at d=32 C=4; max rel diff \S+ .*memory ratio \S+", out, re.MULTILINE), out


def test_a_slow_baseline_runs_on_a_subset_and_still_matches(bench):
    args = bench.parse_args(["--quick", "--baseline-seconds", "0", "--subset", "200"])
    comparison = bench.compare(600, 32, 4, None, args)
    assert comparison.baseline_samples == 200
    assert "run on 200 of 600 samples, scaled linearly" in comparison.line("cpu")
    assert comparison.rel_diff <= 1e-9
