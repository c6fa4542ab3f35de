#!/usr/bin/env python3
"""Write requirements/cpu.lock: every package of the CPU install, exact version and sha256 hash.

Run it from anywhere with the Python the lock is for (3.11 on Linux x86_64 here):

    python3 scripts/lock.py

then commit requirements/cpu.lock and envs/mechinterp.yaml. Rerun it (and commit) whenever pyproject.toml's dependencies,
its `test` extra or its build requirements change, or to move to newer releases; scripts/setup.sh
installs exactly what the lock says, and tests/test_envs.py fails when the lock no longer admits
what pyproject.toml requires.

How: it creates a throwaway venv, upgrades pip there and lets pip resolve, without installing,
`pip install --dry-run --ignore-installed --report` for torch==TORCH (the CPU build, here from the
configured find-links), the build requirements of pyproject.toml (so setup.sh can install the
project with --no-build-isolation) and the project with its `test` extra. Every package of that
report but the project itself becomes one `name==version --hash=sha256:...` line. It stops with an
error when a package comes without a sha256 hash. Standard library only; needs the package index.

It also rewrites envs/mechinterp.yaml (the rules' conda environment, snakemake --use-conda) with the
lock's exact versions. That file cannot point at the lock itself: conda installs its whole pip list
with one `pip install -r`, the list must hold the project (-e ../), and pip refuses an editable
requirement in hash-checking mode ("no single file to hash"), which any hashed line turns on.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "cpu.lock"
CONDA_ENV = REPO / "envs" / "mechinterp.yaml"
TORCH = "2.13.0"  # the CPU build; scripts/setup.sh installs the same version's CUDA build on a GPU machine
EXTRAS = ("test",)
REFRESH = "python3 scripts/lock.py"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fail(message: str) -> None:
    sys.exit(f"lock.py: {message}")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, text=True, capture_output=True, **kwargs)
    if result.returncode:
        fail(f"{' '.join(command)} failed with exit status {result.returncode}:\n"
             f"{result.stdout}{result.stderr}")
    return result


def resolve(pyproject: dict) -> tuple[dict, str]:
    """pip's installation report for the CPU install, and the command that made it (for the header)."""
    extras = pyproject["project"].get("optional-dependencies", {})
    missing = [extra for extra in EXTRAS if extra not in extras]
    if missing:
        fail(f"pyproject.toml has no optional-dependencies {missing}")
    requested = [f"torch=={TORCH}", *pyproject["build-system"]["requires"]]
    project = f"[{','.join(EXTRAS)}]"
    with tempfile.TemporaryDirectory(prefix="mechinterp-lock-") as tmp:
        env = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=True).create(env)
        pip = [str(env / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        run([*pip, "install", "--quiet", "--upgrade", "pip"])
        report = Path(tmp) / "report.json"
        run([*pip, "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
             *requested, "-e", f"{REPO}{project}"])
        pip_version = run([*pip, "--version"]).stdout.split()[1]
        command = shlex.join(["pip", "install", "--dry-run", "--ignore-installed", "--report", "-",
                              *requested, "-e", f".{project}"])
        return json.loads(report.read_text()), f"{command}   (pip {pip_version})"


def lock_lines(report: dict, project: str) -> list[str]:
    lines, unhashed = {}, []
    for item in report["install"]:
        name, version = normalize(item["metadata"]["name"]), item["metadata"]["version"]
        if name == normalize(project):
            continue
        digest = item.get("download_info", {}).get("archive_info", {}).get("hashes", {}).get("sha256")
        if not digest:
            unhashed.append(f"{name}=={version} ({item.get('download_info', {}).get('url', 'no url')})")
            continue
        lines[name] = f"{name}=={version} --hash=sha256:{digest}"
    if unhashed:
        fail("no sha256 hash in pip's report for:\n  " + "\n  ".join(unhashed)
             + "\nEvery locked package must come from an archive with a known hash (wheel or sdist "
               "from an index or find-links), not from a directory or VCS checkout.")
    return [lines[name] for name in sorted(lines)]


def main() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    report, command = resolve(pyproject)
    lines = lock_lines(report, pyproject["project"]["name"])
    env = report.get("environment", {})
    header = [
        "# Exact versions and sha256 hashes of the CPU install: torch (CPU build), the dependencies and",
        f"# the {', '.join(EXTRAS)} extra of pyproject.toml, and its build requirements. Generated by "
        "scripts/lock.py; do not edit.",
        f"# Refresh: {REFRESH}   (then commit this file and envs/mechinterp.yaml)",
        f"# Resolved by: {command}",
        f"# Resolved for: Python {env.get('python_full_version', sys.version.split()[0])} "
        f"({env.get('implementation_name', sys.implementation.name)}), "
        f"{env.get('sys_platform', sys.platform)} {env.get('platform_machine', '')}; wheels of other "
        "Pythons or platforms have other hashes.",
        "# Installed by scripts/setup.sh with: pip install --require-hashes --no-deps -r requirements/cpu.lock",
    ]
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    LOCK.write_text("\n".join(header + lines) + "\n")
    python = env.get("python_version", f"{sys.version_info.major}.{sys.version_info.minor}")
    CONDA_ENV.write_text(conda_env(lines, python))
    print(f"wrote {LOCK.relative_to(REPO)}: {len(lines)} packages, and {CONDA_ENV.relative_to(REPO)}")


def conda_env(lines: list[str], python: str) -> str:
    pins = [line.split(" --hash=")[0] for line in lines]
    return "\n".join([
        "# The one software environment of every rule (snakemake --use-conda). Written by scripts/lock.py",
        "# from requirements/cpu.lock, do not edit: refresh both with `python3 scripts/lock.py`. The pins",
        "# are the lock's versions without its hashes: conda runs one `pip install -r` for this list, and",
        "# pip refuses the editable project (-e ../) once any line has a hash. tests/test_envs.py checks",
        "# that these pins are the lock's.",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
        *(f"      - {pin}" for pin in pins),
        "      - -e ../  # the package itself, from the repository root",
    ]) + "\n"


if __name__ == "__main__":
    main()
