"""The wheel `python -m build` makes: every module, the shipped checkpoints, py.typed, the console script, the version.

The build runs on a copy of the project files a build needs (pyproject.toml, README.md, LICENSE, src/), so
it writes no build/ or .egg-info into the checkout, and builds the wheel from the sdist (`python -m build`'s
default), so the sdist is proven to carry what the wheel needs. ``--no-isolation`` uses this environment's
setuptools instead of downloading one. Installing the wheel and running ``featlift extract`` is
.ci/wheel_check.sh's job.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib
from conftest import REPO

import featlift
from featlift.pretrained import shipped_checkpoints

pytest.importorskip("build", reason="`build` (a dev dependency: pip install -e '.[dev]') is not installed")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = project / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(project)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = dist.glob("*.whl")
    assert len(list(dist.glob("*.tar.gz"))) == 1
    return path


def test_wheel_holds_every_module_the_checkpoints_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = REPO / "src"
    modules = {p.relative_to(source).as_posix() for p in (source / "featlift").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert "featlift/py.typed" in names
    assert "featlift/explorer_page.html" in names  # the explorer's page template
    checkpoints = shipped_checkpoints()
    assert checkpoints
    with zipfile.ZipFile(wheel) as archive:
        for directory in checkpoints:
            for name in ("config.json", "model.safetensors"):
                inside = f"featlift/pretrained/{directory.name}/{name}"
                assert inside in names
                packed = hashlib.sha256(archive.read(inside)).hexdigest()
                assert packed == hashlib.sha256((directory / name).read_bytes()).hexdigest(), inside
    assert not any(n.startswith(("tests/", "benchmarks/")) or n == "hubconf.py" for n in names)


def test_wheel_metadata_version_and_console_script(wheel):
    version = featlift.__version__
    assert wheel.name == f"featlift-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        info = f"featlift-{version}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        assert f"{info}/licenses/LICENSE" in archive.namelist()
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata, flags=re.M)
    for needed in ("torch", "timm", "safetensors", "huggingface_hub"):
        assert needed in requires
    assert "featlift = featlift.cli:main" in entry_points


def test_version_lives_in_one_place_and_the_changelog_has_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    init = (REPO / "src" / "featlift" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M) == [featlift.__version__]
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "https://keepachangelog.com" in changelog
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.M)
    assert headings and headings[0] in ("Unreleased", featlift.__version__)
    released = [h for h in headings if h != "Unreleased"]
    # a released version in the changelog is never ahead of the package's
    assert all(
        tuple(map(int, h.split("."))) <= tuple(map(int, featlift.__version__.split("."))) for h in released
    )
