"""bench/ufm.py --quick still runs and prints one line per case, the first its own baseline."""
import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "ufm.py"


def test_quick_run_prints_a_line_per_case_against_the_first(capsys):
    spec = importlib.util.spec_from_file_location("bench_ufm", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(bench.parse_args(["--quick"])) == 0
    lines = capsys.readouterr().out.splitlines()
    pattern = r"ufm step d=16 K=(\d+) N=(\d+): \S+ ms on cpu, 1 thread\(s\); x(\S+) the baseline \(K=4 N=40\), " \
              r"whose K N it has x(\S+)"
    found = [re.fullmatch(pattern, line) for line in lines]
    assert all(found) and len(found) == 3, lines
    assert [(int(match[1]), int(match[2]), float(match[4])) for match in found] == \
        [(4, 40, 1), (8, 40, 2), (4, 400, 10)]
    assert float(found[0][3]) == 1
