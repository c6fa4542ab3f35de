"""requirements/cpu.lock (written by scripts/lock.py, installed by scripts/setup.sh) must pin, with a
sha256 hash, every requirement of pyproject.toml at a version its range admits, and the rules' conda
environment must install the lock's versions, so `--use-conda` runs the same software as setup.sh."""

from __future__ import annotations

import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

LOCK = REPO / "requirements" / "cpu.lock"
LINE = re.compile(r"^(?P<name>[a-z0-9]+(?:-[a-z0-9]+)*)==(?P<version>\S+) --hash=sha256:[0-9a-f]{64}$")


def lock_entries(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def locked_versions(text: str) -> dict[str, str]:
    return {canonicalize_name(line.split("==")[0]): line.split("==")[1].split()[0] for line in lock_entries(text)}


def requirements(pyproject: dict) -> list[str]:
    """What the lock must satisfy: the dependencies, every extra and the build requirements."""
    project = pyproject["project"]
    extras = [req for group in project.get("optional-dependencies", {}).values() for req in group]
    return [*project["dependencies"], *extras, *pyproject["build-system"]["requires"]]


def unmet(pyproject: dict, lock_text: str) -> list[str]:
    """Requirements of pyproject.toml that the lock leaves out or pins outside their range."""
    locked, problems = locked_versions(lock_text), []
    for text in requirements(pyproject):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{text}: not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{text}: the lock pins {version}")
    return problems


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_lock_pins_every_requirement_of_pyproject_inside_its_range():
    assert unmet(pyproject(), LOCK.read_text()) == [], "refresh the lock: python3 scripts/lock.py"


def test_unmet_requirements_are_reported():
    project = pyproject()
    project["project"]["dependencies"] = [*project["project"]["dependencies"], "not-a-locked-package>=1"]
    text = LOCK.read_text()
    assert unmet(project, text) == ["not-a-locked-package>=1: not in the lock"]
    numpy = locked_versions(text)["numpy"]
    assert unmet(pyproject(), text.replace(f"numpy=={numpy} ", "numpy==1.0 ")) == ["numpy>=1.26: the lock pins 1.0"]
    pytest_line = next(line for line in lock_entries(text) if line.startswith("pytest=="))
    assert unmet(pyproject(), text.replace(pytest_line + "\n", "")) == ["pytest>=8: not in the lock"]


def test_every_lock_line_is_one_hashed_exact_pin_sorted():
    text = LOCK.read_text()
    entries = lock_entries(text)
    assert [line for line in entries if not LINE.match(line)] == []
    names = [line.split("==")[0] for line in entries]
    assert names == sorted(set(names))
    assert canonicalize_name(pyproject()["project"]["name"]) not in names  # setup.sh installs it from the checkout
    assert "# Refresh: python3 scripts/lock.py" in text
    assert re.search(r"^torch==[^ ]+\+cpu ", text, re.M)  # the CPU build


def test_conda_env_installs_the_lock():
    env = yaml.safe_load((REPO / "envs" / "mechinterp.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = [line.split(" --hash=")[0] for line in lock_entries(LOCK.read_text())]
    # The lock's versions, without its hashes: pip refuses the editable project in hash-checking mode.
    assert pip == [*pins, "-e ../"]  # the package itself, from the repository root
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    resolved = re.search(r"^# Resolved for: Python (\d+\.\d+)\.", LOCK.read_text(), re.M).group(1)
    assert python == f"python={resolved}"
    minimum = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, resolved.split("."))) >= tuple(map(int, minimum.split(".")))
