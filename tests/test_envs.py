"""The rules' conda environment and the package metadata must name the same requirements, so
`--use-conda` runs the same software as `pip install -e .`."""

from __future__ import annotations

import tomllib

import yaml

from conftest import REPO


def test_conda_env_pins_what_pyproject_requires():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "envs" / "mechinterp.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(r for r in pip if not r.startswith("-e ")) == sorted(project["dependencies"])
    assert "-e ../" in pip  # the package itself, from the repository root
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.removeprefix("python=").split("."))) >= tuple(map(int, minimum.split(".")))
