"""The docs work from a fresh clone: no path of one developer's machine in README.md or docs/, and the README's quick
path runs as written on the embedded data."""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest

from epee_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted(path for path in (ROOT / "docs").rglob("*") if path.is_file())]
QUICK_PATH = re.compile(r"<!-- quick-path -->(.*?)<!-- /quick-path -->", re.S)


def machine_paths() -> dict[str, re.Pattern]:
    """What must not appear in the docs: the shared folder beside the checkout, the checkout's parent, the temp folder."""

    def as_path(path: str) -> re.Pattern:
        # the folder itself or anything in it, not a longer name that starts the same ("/tmpfs", "logs/tmp")
        return re.compile(r"(?<![\w./-])" + re.escape(path.rstrip("/")) + r"(?![\w.-])")

    return {
        "../shared": re.compile(re.escape("../shared")),
        "the checkout's parent folder": as_path(str(ROOT.parent)),
        "the temp folder": as_path(tempfile.gettempdir()),
    }


def test_docs_name_no_path_of_this_machine():
    found = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            found += [
                f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()[:100]}"
                for what, pattern in machine_paths().items()
                if pattern.search(line)
            ]
    assert not found, "\n".join(found)


def test_the_machine_path_check_finds_a_temp_path_and_ignores_look_alikes():
    temp = machine_paths()["the temp folder"]
    assert temp.search(f"see {tempfile.gettempdir()}/models here")
    assert not temp.search(f"a {tempfile.gettempdir()}fs mount and logs{tempfile.gettempdir()}/port")


def quick_path_commands(readme: str) -> list[list[str]]:
    """The `epee ...` commands of the README's quick path, continuation lines joined, as argument lists."""
    section = QUICK_PATH.search(readme)
    assert section, "README.md has no <!-- quick-path --> ... <!-- /quick-path --> section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "epee":
                commands.append(words[1:])
    return commands


def test_the_quick_path_is_train_evaluate_calibrate_package():
    commands = quick_path_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [command[0] for command in commands] == ["train", "evaluate", "calibrate", "package"]


@pytest.mark.docs_commands
def test_the_readme_quick_path_runs_as_written_in_a_fresh_folder(tmp_path, monkeypatch):
    """Every quick-path command exits 0, run in a folder holding only the embedded data (53 s on 2 busy cores)."""
    shutil.copytree(ROOT / "epee_core" / "data", tmp_path / "epee_core" / "data")
    monkeypatch.chdir(tmp_path)
    for command in quick_path_commands((ROOT / "README.md").read_text(encoding="utf-8")):
        assert main(command) == 0, f"epee {shlex.join(command)}"
    assert (tmp_path / "model_store" / "quick.mar").is_file()
