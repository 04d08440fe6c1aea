"""The agent bundle: a wheelhouse of the project and the agent's dependencies for one
target platform (Python X.Y, CPU architecture, glibc), as one tar file.

Why a wheelhouse and not a zipapp: zstandard, uvloop, cryptography, xxhash and crc32c
are compiled extensions, which zipimport cannot load; a zipapp would have to unpack
itself at run time anyway. The host installs the wheels into a venv with the pip
wheel the bundle carries (pip runs from its own wheel), so the host needs neither
network nor Debian's python3-venv/ensurepip.

Layout of the tar (deterministic: sorted, mtime 0, owner 0, so the same inputs give
the same bytes and the sha256 is the bundle's identity):
    bundle.json                 {"format", "version", "python", "arch", "glibc", "source"}
    secondsite-agent.service    the unit template (units/)
    wheels/*.whl                secondsite, its default dependencies, pip
Cached as CACHE/secondsite-agent-VERSION-pyX.Y-ARCH-glibcG-SOURCE.tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.push.errors import BundleUnavailable

REPO = Path(__file__).resolve().parents[2]
FORMAT = 1
SOURCES = ("pyproject.toml", "README.md", "appliance", "agent", "tui")
UNIT = "secondsite-agent.service"
PIP_TIMEOUT = 600.0


@dataclass(frozen=True)
class Platform:
    python: str  # "3.11"
    arch: str  # uname -m: x86_64, aarch64
    glibc: str  # "2.36"

    @property
    def tag(self) -> str:
        return f"py{self.python}-{self.arch}-glibc{self.glibc}"


@dataclass(frozen=True)
class Bundle:
    path: Path
    sha256: str
    version: str
    platform: Platform

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def load_bundle(path: Path) -> Bundle:
    """A bundle file's identity and platform (read from its bundle.json)."""
    try:
        with tarfile.open(path) as tar:
            member = tar.extractfile("bundle.json")
            meta = json.loads(member.read()) if member else None
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise BundleUnavailable(f"{path} is not an agent bundle: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleUnavailable(f"{path}: unknown bundle format")
    platform = Platform(str(meta["python"]), str(meta["arch"]), str(meta["glibc"]))
    return Bundle(path, _sha256(path), str(meta["version"]), platform)


def build_bundle(cache_dir: Path, platform: Platform, *, project: Path = REPO) -> Bundle:
    """The cached bundle for `platform`, built first if this source has none yet."""
    project_meta = _project(project)
    source = _source_digest(project)
    name = f"secondsite-agent-{project_meta['version']}-{platform.tag}-{source[:12]}.tar"
    cached = cache_dir / name
    if cached.exists():
        return load_bundle(cached)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bundle-", dir=cache_dir) as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        _project_wheel(project, work / "src", wheels)
        _dependency_wheels(list(project_meta["dependencies"]), platform, wheels)
        meta = {
            "format": FORMAT,
            "version": project_meta["version"],
            "python": platform.python,
            "arch": platform.arch,
            "glibc": platform.glibc,
            "source": source,
        }
        files = {"bundle.json": json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n"}
        files[UNIT] = (project / "units" / UNIT).read_bytes()
        for wheel in sorted(wheels.glob("*.whl")):
            files[f"wheels/{wheel.name}"] = wheel.read_bytes()
        partial = work / "bundle.tar"
        _write_tar(partial, files)
        with partial.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, cached)
    return load_bundle(cached)


def _project(project: Path) -> dict[str, Any]:
    with (project / "pyproject.toml").open("rb") as fh:
        meta: dict[str, Any] = tomllib.load(fh)["project"]
    return meta


def _source_digest(project: Path) -> str:
    """What the project wheel is made of, so an edited checkout makes a new bundle."""
    digest = hashlib.sha256()
    paths: list[Path] = []
    for name in (*SOURCES, f"units/{UNIT}"):
        top = project / name
        paths += sorted(top.rglob("*")) if top.is_dir() else [top]
    for path in paths:
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(project)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _project_wheel(project: Path, src: Path, out: Path) -> None:
    # Built from a copy: building in place would leave build/ and egg-info in the checkout.
    src.mkdir()
    for name in SOURCES:
        origin = project / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, src / name)
    # Isolated build: pip fetches the build backend pyproject.toml names.
    _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(src))


def _dependency_wheels(requirements: list[str], platform: Platform, out: Path) -> None:
    # pip takes --platform literally; a wheel for an older glibc runs on a newer one,
    # so every manylinux tag up to the host's glibc is acceptable.
    major, minor = (int(x) for x in platform.glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_{platform.arch}" for m in range(minor, 4, -1)]
    tags += [f"manylinux{t}_{platform.arch}" for t in ("2014", "2010", "1")]
    _pip(
        "download", "--only-binary=:all:", "--dest", str(out),
        "--python-version", platform.python, "--implementation", "cp",
        *(arg for tag in tags for arg in ("--platform", tag)),
        "pip", *requirements,
    )  # fmt: skip


def _pip(*args: str) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
            capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BundleUnavailable(f"pip {args[0]} took more than {PIP_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.strip() and not x.startswith("hint")]
        last = (lines or ["(no output)"])[-1].strip()
        raise BundleUnavailable(
            f"pip {args[0]} failed: {last}",
            "the bundle needs PyPI (or a pip cache holding the wheels) for the host's platform",
        )


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
