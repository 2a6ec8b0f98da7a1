"""The MIT license that pyproject.toml declares ships as a LICENSE file in the sdist and the wheel: both are
built here (setuptools' PEP 517 hooks, no network) from a copy of the project, and their contents read."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_declared_license_ships_as_a_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_the_built_sdist_and_wheel_carry_the_license(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    out.mkdir()
    for hook in ("build_sdist", "build_wheel"):  # one interpreter each, as a build frontend runs them
        code = f"from setuptools import build_meta; build_meta.{hook}({str(out)!r})"
        done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    (sdist_path,) = out.glob("*.tar.gz")
    (wheel_path,) = out.glob("*.whl")
    with tarfile.open(sdist_path) as sdist:
        assert any(name.endswith("/LICENSE") for name in sdist.getnames())
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
        metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
        text = wheel.read(metadata).decode()
    assert "License-File: LICENSE" in text
    assert "License-Expression: MIT" in text or "License: MIT" in text
