"""The project installs as a package: `pip install .` takes the same runtime pins as requirements.txt,
and `python -m app` then runs from any folder."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support import ROOT


def test_the_package_pins_what_requirements_txt_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project["dependencies"] == [p for p in pinned if p]


def test_the_installed_app_runs_from_another_folder(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "usage: python -m app" in result.stdout, result.stderr
