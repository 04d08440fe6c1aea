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

Where the process server gets one (`bundle_for`): first the bundles the appliance
image carries (SHIPPED, built by `python -m appliance.push.bundle build` in
image/build.sh for the CPython versions the agent runs on, with manylinux2014 wheels
so any glibc >= 2.17 takes them); else, in a source checkout, built and cached; else
BundleUnavailable naming both.
"""

from __future__ import annotations

import argparse
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
SHIPPED = Path("/usr/lib/secondsite/bundles")
SHIPPED_ENV = "SECONDSITE_BUNDLE_DIR"  # another SHIPPED (tests, a hand-made set)
#: What the image carries: CPython 3.11+ (the agent's minimum) on x86_64, and the
#: oldest glibc manylinux2014 wheels need, so one bundle fits every distribution.
IMAGE_PYTHONS = ("3.11", "3.12", "3.13")
IMAGE_ARCHES = ("x86_64",)
BASELINE_GLIBC = "2.17"


@dataclass(frozen=True)
class Platform:
    python: str  # "3.11"
    arch: str  # uname -m: x86_64, aarch64
    glibc: str  # "2.36"

    @property
    def tag(self) -> str:
        return f"py{self.python}-{self.arch}-glibc{self.glibc}"

    def runs_on(self, host: Platform) -> bool:
        """A bundle for this platform works on `host`: same Python and CPU, and wheels
        for a glibc no newer than the host's."""
        return (
            self.python == host.python
            and self.arch == host.arch
            and _version(self.glibc) <= _version(host.glibc)
        )


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


def shipped_dir() -> Path:
    return Path(os.environ.get(SHIPPED_ENV) or SHIPPED)


def find_bundle(directory: Path, host: Platform) -> Bundle | None:
    """The bundle in `directory` that runs on `host` (the newest glibc of those)."""
    fitting = []
    for path in sorted(directory.glob("*.tar")):
        try:
            bundle = load_bundle(path)
        except BundleUnavailable:
            continue  # a stray file is not a reason to refuse the host
        if bundle.platform.runs_on(host):
            fitting.append(bundle)
    return max(fitting, key=lambda b: _version(b.platform.glibc), default=None)


def bundle_for(
    host: Platform, cache_dir: Path, *, shipped: Path | None = None, project: Path = REPO
) -> Bundle:
    """A bundle for `host`: a shipped one, else one built from the checkout."""
    shipped = shipped or shipped_dir()
    if shipped.is_dir() and (found := find_bundle(shipped, host)) is not None:
        return found
    if not (project / "pyproject.toml").is_file():
        raise BundleUnavailable(
            f"no agent bundle for Python {host.python} on {host.arch} (glibc {host.glibc}) "
            f"in {shipped}, and no source checkout to build one from",
            f"the image carries bundles for CPython {', '.join(IMAGE_PYTHONS)} on "
            f"{', '.join(IMAGE_ARCHES)}: give the host one of those as python3, or build "
            f"one with 'python -m appliance.push.bundle build --out {shipped}'",
        )
    return build_bundle(cache_dir, host, project=project)


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


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split("."))
    except ValueError:
        return (0,)


# -- python -m appliance.push.bundle ----------------------------------------------------

DESCRIPTION = f"""\
Build the agent bundles the process server copies to hosts at push installation: one
tar per CPython version and CPU architecture, each a wheelhouse of this checkout's
secondsite wheel, the agent's dependencies and pip (no network needed on the host).
The process server looks for them in {SHIPPED}
(or ${SHIPPED_ENV}) before building one from a checkout; the appliance image
carries them there.

The dependency wheels come from pip download (PyPI, or the configured index and
find-links), for manylinux wheels no newer than --glibc.
"""
EPILOG = f"""\
commands:
  build --out DIR   build the bundles into DIR (an existing bundle of the same source
                    and platform is kept); prints one line per bundle: file, Python,
                    architecture, glibc, size, sha256
  list DIR          the bundles in DIR, in the same form

examples:
  python -m appliance.push.bundle build --out {SHIPPED}
  python -m appliance.push.bundle build --out /tmp/b --python 3.12 --arch aarch64 --json

exit status: 0 done, 1 a bundle could not be built (the message says why), 2 usage.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.push.bundle", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = sub.add_parser("build", help="build bundles into a directory")
    build.add_argument("--out", required=True, type=Path, metavar="DIR")
    build.add_argument("--python", action="append", metavar="X.Y", help="a CPython "
                       f"version (repeatable; default: {' '.join(IMAGE_PYTHONS)})")  # fmt: skip
    build.add_argument("--arch", action="append", choices=("x86_64", "aarch64"), help="a CPU "
                       f"architecture (repeatable; default: {' '.join(IMAGE_ARCHES)})")  # fmt: skip
    build.add_argument("--glibc", default=BASELINE_GLIBC, metavar="X.Y", help="the oldest "
                       f"glibc the bundles must run on (default: {BASELINE_GLIBC})")  # fmt: skip
    listing = sub.add_parser("list", help="list the bundles in a directory")
    listing.add_argument("dir", type=Path, metavar="DIR")
    for p in (build, listing):
        p.add_argument("--json", action="store_true", help="print a JSON list instead")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            pythons, arches = args.python or IMAGE_PYTHONS, args.arch or IMAGE_ARCHES
            for version in (*pythons, args.glibc):
                if not _is_version(version):
                    parser.error(f"{version!r} is not a version like 3.12")
            bundles = [build_bundle(args.out, Platform(py, arch, args.glibc))
                       for py in pythons for arch in arches]  # fmt: skip
        elif not args.dir.is_dir():
            raise BundleUnavailable(f"{args.dir} is not a directory")
        else:
            bundles = []
            for path in sorted(args.dir.glob("*.tar")):
                try:
                    bundles.append(load_bundle(path))
                except BundleUnavailable as exc:  # as the process server does: skipped
                    print(f"bundle: warning: {exc.message.splitlines()[0]}", file=sys.stderr)
    except (BundleUnavailable, OSError) as exc:
        message = exc.message if isinstance(exc, BundleUnavailable) else str(exc)
        print(f"bundle: error: {message}", file=sys.stderr)
        return 1
    if args.json:
        rows = [{"path": str(b.path), "version": b.version, "python": b.platform.python,
                 "arch": b.platform.arch, "glibc": b.platform.glibc, "size": b.size,
                 "sha256": b.sha256} for b in bundles]  # fmt: skip
        print(json.dumps(rows, indent=1))
    for b in [] if args.json else bundles:
        on = b.platform
        print(f"{b.path}  py{on.python} {on.arch} glibc>={on.glibc}  "
              f"{b.size / (1 << 20):.1f} MiB  {b.sha256}")  # fmt: skip
    return 0


def _is_version(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 2 and all(x.isdigit() for x in parts)


if __name__ == "__main__":
    sys.exit(main())
