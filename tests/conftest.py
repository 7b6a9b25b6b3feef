"""Test-wide settings: one torch thread, since two threads on two loaded cores can be 100x slower; and the
fixtures several test files share."""
import os
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)
# The packages the design builds on; pytest runs the tests. requirements.txt's others are optional.
DESIGN_PACKAGES = {"torch", "torchvision", "numpy", "scipy", "matplotlib", "tqdm", "pillow", "pytest"}


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
