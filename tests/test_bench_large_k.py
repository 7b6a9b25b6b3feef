"""bench/large_k.py --quick still runs, prints its rows, and finds the tiled measures equal to the dense ones."""
import csv
import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "large_k.py"


@pytest.mark.slow
def test_quick_run_prints_its_rows_and_matches_the_dense_computation(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_large_k", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(bench.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path / "rows.csv")])) == 0
    out = capsys.readouterr().out
    assert re.search(r"^what measure, classes 60, dim 16, samples 600, threads 1, seconds \S+, peak_rss_gib \S+",
                     out, re.MULTILINE), out
    assert re.search(r"^growth: K x3 -> time x\S+$", out, re.MULTILINE), out
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert [row["what"] for row in rows] == ["measure", "tiled", "dense"] * 2
    assert all(float(row["max_rel_diff"]) <= 1e-10 for row in rows if row["max_rel_diff"])
