"""Imports flow one way, and every script runs with only the design's packages: torch, torchvision, numpy,
scipy, matplotlib and tqdm (with pillow, which torchvision and matplotlib need). The other packages in
requirements.txt are optional, imported only where they are used: submitit to submit a study to Slurm,
tensorboard for --tensorboard, foolbox (and eagerpy) by the tests alone."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_flags

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_flags(2, 2, 10)


def import_graph() -> dict[str, set[str]]:
    """The repository's modules (scripts included) and the repository modules each imports, wherever in
    the file the import statement is (a function's too)."""
    files = [*REPO.glob("*.py"), *REPO.glob("models/*.py"), *REPO.glob("scripts/*.py")]
    names = {_module_name(path) for path in files}
    graph = {}
    for path in files:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[_module_name(path)] = {name for name in imported if name in names} - {_module_name(path)}
    return graph


def third_party_imports(module: str) -> set[str]:
    """The top-level names of the packages outside the repository that `module` imports, anywhere in it."""
    path = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse((path if path.exists() else path.with_suffix("") / "__init__.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"import cycle through {start}"
            if module not in seen:
                seen.add(module)
                todo += graph[module]


def test_plotting_needs_neither_the_study_runner_nor_an_optional_package(optional_packages):
    graph = import_graph()
    reached, todo = set(), ["plotting"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert "studies" not in reached and "slurm" not in reached
    optional = set(optional_packages)
    assert {"submitit", "tensorboard", "foolbox"} <= optional
    for module in reached:
        assert not third_party_imports(module) & optional, module


def test_only_the_slurm_module_imports_submitit():
    importers = [module for module in import_graph() if "submitit" in third_party_imports(module)]
    assert importers == ["slurm"]


@pytest.mark.slow
def test_every_script_runs_with_only_the_design_packages(tmp_path, design_packages_only, optional_packages):
    env = {**design_packages_only, "MPLBACKEND": "Agg"}

    def run(*words: str) -> subprocess.CompletedProcess:
        done = subprocess.run(list(words), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{words}: {done.stderr[-2000:]}"
        return done

    for name in optional_packages:
        refused = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert refused.returncode == 1 and "ModuleNotFoundError" in refused.stderr, name
    run_dir = tmp_path / "runs" / "tiny"
    run(sys.executable, str(REPO / "train.py"), *TINY, "--run-dir", str(run_dir))
    run(sys.executable, str(REPO / "validate_nc.py"), "--run-dir", str(run_dir), "--device", "cpu")
    run(sys.executable, str(REPO / "plotting.py"), "panel", str(run_dir), "--out", str(tmp_path / "panel.pdf"))
    run(sys.executable, str(REPO / "plotting.py"), "table", str(run_dir))
    run(sys.executable, str(REPO / "sweep.py"), "--name", "tiny", *TINY, "--seed", "0", "1")
    rows = (tmp_path / "studies" / "tiny" / "runs.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in row for row in rows[1:])
    run(sys.executable, str(REPO / "plotting.py"), "study", "studies/tiny")
    refused = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "--run-dir", str(tmp_path / "board"),
                              "--tensorboard"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --tensorboard needs the tensorboard package")
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == 2
    # scripts/paper_scale.sh --tiny, with scripts/gpu_check.py --tiny in it, runs so in test_paper_scale.py


def _module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    return ".".join(relative.parts[:-1] + (() if relative.name == "__init__" else (relative.name,)))


@pytest.mark.parametrize("module", ["runs", "reports", "studies"])
def test_the_run_folder_table_1_and_the_studies_import_no_plotting(module):
    """Printing Table 1 or deciding that a run is done draws nothing, so it imports neither plotting.py nor
    matplotlib (whose import alone takes seconds)."""
    probe = f"import sys, {module}; print(sorted(name for name in ('plotting', 'matplotlib') if name in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
