"""The commands that README.md and docs/*.md print write only into folders git ignores: every output a
command names (--out, --run-dir, --plots-dir, --results, --runs-dir, sweep.py's studies/NAME, a --download's
--data-root) is ignored by .gitignore, and the README's quick start and everyday workflow, run as printed
but on tiny settings in a fresh clone of the repository, leave `git status` clean."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import config
import train

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OUTPUT_FLAGS = ("--out", "--run-dir", "--plots-dir", "--results", "--runs-dir")
OPERATORS = {"&&", "||", "&", ";", "|"}
# What makes the README's runs tiny: a network of width 4 on 20 images per class for 3 epochs (run names
# gain -w4-spc20-ep3).
SIZE = ["--width", "4", "--samples-per-class", "20", "--epochs", "3"]
TINY = {"train.py": [*SIZE, "--num-checkpoints", "3"], "sweep.py": [*SIZE, "--num-checkpoints", "3"],
        "validate_nc.py": SIZE}
# The blocks run in the clone, in this order: (page, section heading, how many of its bash blocks; None: all).
WORKFLOW = [("README.md", "Quick start", 1), ("README.md", "The everyday workflow", None)]
SKIPPED = ("pip install", "python -m pytest")  # the install, and the test suite this test is part of


def in_git_work_tree() -> bool:
    if shutil.which("git") is None:
        return False
    answer = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True, text=True)
    return answer.stdout.strip() == "true"


needs_git = pytest.mark.skipif(not in_git_work_tree(), reason="needs git and the repository's work tree")


# ---------------------------------------------------------------- every output named is ignored

@needs_git
def test_every_output_a_printed_command_names_is_ignored_by_git():
    named = [(page.relative_to(REPO), command, path) for page in PAGES for command in page_commands(page)
             for path in named_outputs(command)]
    assert len(named) >= 10, named  # the README and the docs name outputs; none found means the parser broke
    assert {"compare/", "studies/losses"} <= {path for _, _, path in named}
    offending = [f"{page}: {shlex.join(command)} writes {path}" for page, command, path in named
                 if not ignored(path)]
    assert not offending, "\n".join(offending)


@needs_git
def test_the_check_tells_shipped_and_ignored_paths_apart():
    assert not ignored("docs/synthetic_panel.png") and not ignored("README.md") and not ignored("docs/new.png")
    assert ignored("runs/any-run") and ignored("compare/panel.pdf") and ignored("CIFAR10_plots/run/fig6_nc1.png")


def test_outputs_are_read_from_the_flags_a_command_gives():
    command = shlex.split("python sweep.py --name study --plots-dir=P --out O --run-dir R --results S --runs-dir T")
    assert named_outputs(command) == ["studies/study", "P", "O", "R", "S", "T"]
    assert named_outputs(shlex.split("python train.py --data-root D --download")) == ["D"]
    assert named_outputs(shlex.split("python train.py --data-root D")) == []


# ---------------------------------------------------------------- the README's workflow leaves git status clean

@pytest.mark.slow
@needs_git
def test_the_readme_s_workflow_on_tiny_settings_leaves_git_status_clean(tmp_path):
    clone = snapshot_clone(tmp_path / "clone")
    script = workflow_script()
    done = subprocess.run(["bash", "-c", script], cwd=clone, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert done.returncode == 0, f"{script}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    # The commands did their work: the outputs they name are there, and the study's four runs.
    assert {"compare/panel.pdf", "compare/by_loss.png", "studies/losses/panel.png", "compare/fig6_nc1.png"} <= {
        str(path.relative_to(clone)) for path in clone.rglob("*") if path.is_file()}
    assert sorted(path.name for path in (clone / "runs").iterdir()) == [
        f"synthetic-resnet18-{loss}-seed{seed}-w4-spc20-ep3" for loss in ("ce", "mse") for seed in (0, 1)]


def workflow_script() -> str:
    """The WORKFLOW blocks as one bash script: each train.py, validate_nc.py and sweep.py command given the
    TINY flags, every run folder it names renamed to its tiny run's, background jobs waited for."""
    lines = ["set -euo pipefail", "background=()"]
    renamed: dict[str, str] = {}
    for page, heading, count in WORKFLOW:
        blocks = [body for language, body in fenced_blocks(section(REPO / page, heading)) if language == "bash"]
        assert blocks, f"{page} has no bash block under {heading}"
        for line in (line for block in blocks[:count] for line in block_commands(block)):
            for command in line.split(" && "):
                if not command.startswith(SKIPPED):
                    lines.append(tiny_command(command, renamed))
    lines.append('for job in "${background[@]}"; do wait "$job"; done')
    return "\n".join(lines) + "\n"


def tiny_command(command: str, renamed: dict[str, str]) -> str:
    """The command on tiny settings; a train.py command adds its run folder's tiny name to `renamed`."""
    in_background = command.endswith(" &")
    command = command.removesuffix(" &")
    words = shlex.split(command)
    script = words[1] if words[0] == "python" else ""
    if script == "train.py":
        renamed[f"runs/{run_name(words[2:])}"] = f"runs/{run_name(words[2:] + TINY[script])}"
    if script in TINY and not (script == "validate_nc.py" and "--run-dir" in words):
        command += " " + shlex.join(TINY[script])
    for name, tiny in renamed.items():
        command = re.sub(re.escape(name) + r"(?![\w.-])", tiny, command)
    command = re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)
    return f"{command} & background+=($!)" if in_background else command


# ---------------------------------------------------------------- helpers

def page_commands(page: Path) -> list[list[str]]:
    """The commands of the page's fenced code blocks that run one of the repo's scripts, as word lists."""
    return [words for _, body in fenced_blocks(page.read_text()) for line in block_commands(body)
            for words in split_commands(line) if runs_repo_script(words)]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def block_commands(body: str) -> list[str]:
    """A block's command lines, continuations joined, a `$ ` prompt and trailing comments dropped."""
    lines = []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\$ ", "", line.strip())
        line = re.sub(r"\s+#.*$", "", line)
        if line and not line.startswith("#"):
            lines.append(re.sub(r"\s+", " ", line))
    return lines


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at &&, ||, &, ; and |, each without its VAR=value prefix."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [without_assignments(words) for words in commands if words]


def without_assignments(words: list[str]) -> list[str]:
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
        words = words[1:]
    return words


def runs_repo_script(words: list[str]) -> bool:
    return bool(words) and (words[0].startswith("scripts/") or (
        words[0] in ("python", "python3", "torchrun") and any(word.endswith(".py") for word in words[1:])))


def named_outputs(words: list[str]) -> list[str]:
    """The paths a command names as what it writes."""
    outputs = []
    for index, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag in OUTPUT_FLAGS or (flag == "--name" and "sweep.py" in words):
            path = value or (words[index + 1] if index + 1 < len(words) else "")
            outputs.append(f"studies/{path}" if flag == "--name" else path)
    if "--download" in words and "--data-root" in words:
        outputs.append(words[words.index("--data-root") + 1])
    return outputs


def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--", path], cwd=REPO).returncode == 0


def section(page: Path, heading: str) -> str:
    """The text under the heading of any level that begins with `heading`, to the next heading of that level
    or above."""
    text = page.read_text()
    match = re.search(rf"^(#+) {re.escape(heading)}.*\n", text, re.MULTILINE)
    assert match, f"{page.name} has no heading {heading!r}"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[match.end():], re.MULTILINE)
    return text[match.end():match.end() + end.start() if end else len(text)]


def run_name(flags: list[str]) -> str:
    args = train.parse_args(flags)
    return config.run_name(config.resolve_config(args))


def git(folder: Path, *arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True, check=True).stdout


def snapshot_clone(clone: Path) -> Path:
    """A fresh clone of the repository whose HEAD holds the working tree as it is now, uncommitted changes
    and untracked files that git does not ignore included, so that `git status` there starts clean."""
    git(REPO.parent, "clone", "--quiet", str(REPO), str(clone))
    listed = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    present = {name for name in listed if name and (REPO / name).is_file()}
    for name in git(clone, "ls-files", "-z").split("\0"):
        if name and name not in present:
            (clone / name).unlink()
    for name in present:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    git(clone, "add", "--all")
    git(clone, "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "--quiet", "--allow-empty",
        "--no-verify", "-m", "the working tree")
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""
    return clone
