"""The repository names no absolute path of one machine (data is found via ../shared, relative to the root)."""

import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_absolute_machine_paths_in_tracked_files():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(["git", "grep", "-nE", "(/work|/root|/home)/"], cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 1, f"absolute machine paths in the repository:\n{found.stdout[:2000]}"
