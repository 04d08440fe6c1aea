"""Host-side helpers for the image boot test (image/boot-test.sh); test-only.

    python -m tests.image.bootkit pki DIR          throwaway CA + targetd TLS material,
                                                   and the credential that delivers it
    python -m tests.image.bootkit probe DIR PORT   TLS handshake with the guest's targetd
    python -m tests.image.bootkit qmp SOCKET CMD   one QMP command (system_powerdown, quit)
    python -m tests.image.bootkit free-port        a free TCP port on 127.0.0.1
    python -m tests.image.bootkit ovf-iso ISO KEY=VALUE... [--mac MAC]
                                                   an ISO 9660 image holding ovf-env.xml
                                                   (the OVF ISO transport), by genisoimage

How the TLS material reaches a guest that has not been enrolled: the systemd credential
`tmpfiles.extra` (systemd 252 reads credentials from SMBIOS type 11 OEM strings, and
systemd-tmpfiles-setup.service applies `tmpfiles.extra` as extra tmpfiles.d lines at
sysinit). The lines write the files where enrolment will put them, owned by the
`secondsite` user, before secondsite-targetd's ConditionPathExists= is checked. Nothing
in the image knows about it: it is the standard systemd provisioning path.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.pki import Authority
from tests.setup.ovfdoc import environment

STATE = "/var/lib/secondsite/target"
SERVER_NAME = "target.test"


def tmpfiles_line(kind: str, path: str, mode: str, argument: str = "") -> str:
    line = f"{kind} {path} {mode} secondsite secondsite -"
    if argument:
        # tmpfiles.d arguments take C escapes; specifiers (%) are expanded, so escape them.
        escaped = argument.replace("\\", "\\\\").replace("\n", "\\n").replace("%", "%%")
        line += f" {escaped}"
    return line


def make_pki(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority.create(directory / "authority", "Secondsite Boot Test CA")
    server = ca.issue(SERVER_NAME)
    client = ca.issue("process.test")
    files = {
        "ca.crt": ca.cert,
        "target.crt": server.cert,
        "target.key": server.key,
        "client.crt": client.cert,
        "client.key": client.key,
    }
    for name, source in files.items():
        shutil.copyfile(source, directory / name)
    lines = [
        "d /var/lib/secondsite 0755 root root -",
        tmpfiles_line("d", STATE, "0750"),
        tmpfiles_line("d", f"{STATE}/tls", "0750"),
        tmpfiles_line("f", f"{STATE}/tls/ca.crt", "0644", ca.cert.read_text()),
        tmpfiles_line("f", f"{STATE}/tls/target.crt", "0644", server.cert.read_text()),
        tmpfiles_line("f", f"{STATE}/tls/target.key", "0600", server.key.read_text()),
    ]
    extra = "\n".join(lines) + "\n"
    (directory / "tmpfiles.extra").write_text(extra)
    encoded = base64.b64encode(extra.encode()).decode()
    # For QEMU: -smbios type=11,value=<this> (no commas in base64, so no escaping).
    (directory / "smbios-credential").write_text(
        f"io.systemd.credential.binary:tmpfiles.extra={encoded}"
    )


def probe(directory: Path, port: int, timeout: float) -> int:
    """Handshake until it works or `timeout` passes; print what the server presented."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=directory / "ca.crt")
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(directory / "client.crt", directory / "client.key")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
            ):
                cert: dict[str, Any] = dict(tls.getpeercert() or {})
                subject = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
                print(
                    json.dumps(
                        {
                            "tls": tls.version(),
                            "cipher": (tls.cipher() or ("?",))[0],
                            "server_cn": subject.get("commonName"),
                        }
                    )
                )
                return 0
        except (OSError, ssl.SSLError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(2)
    print(f"bootkit: no TLS handshake with 127.0.0.1:{port} ({last})", file=sys.stderr)
    return 1


def qmp(path: Path, command: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        for execute in ("qmp_capabilities", command):
            sock.sendall(json.dumps({"execute": execute}).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline() or b"{}")
                if "event" not in reply:
                    break
            if "error" in reply:
                print(f"bootkit: qmp {execute}: {reply['error']}", file=sys.stderr)
                return 1
    return 0


def ovf_iso(iso: Path, properties: list[str], macs: list[str]) -> int:
    """What vSphere attaches for ovf:transport="iso": ovf-env.xml at the root of an ISO
    9660 image (Rock Ridge and Joliet names, as genisoimage writes by default here)."""
    values = {}
    for item in properties:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"bootkit: ovf-iso: {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        values[key] = value
    program = shutil.which("genisoimage")
    if program is None:
        print("bootkit: genisoimage not found (hint: make image-deps)", file=sys.stderr)
        return 1
    content = iso.with_suffix(".d")
    content.mkdir(parents=True, exist_ok=True)
    (content / "ovf-env.xml").write_text(environment(values, tuple(macs)))
    done = subprocess.run(
        [program, "-quiet", "-r", "-J", "-V", "OVF ENV", "-o", str(iso), str(content)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        print(f"bootkit: genisoimage failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bootkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pki")
    p.add_argument("directory", type=Path)
    p = sub.add_parser("probe")
    p.add_argument("directory", type=Path)
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("qmp")
    p.add_argument("socket", type=Path)
    p.add_argument("qmp_command")
    sub.add_parser("free-port")
    p = sub.add_parser("ovf-iso")
    p.add_argument("iso", type=Path)
    p.add_argument("properties", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--mac", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "pki":
        make_pki(args.directory)
        return 0
    if args.command == "probe":
        return probe(args.directory, args.port, args.timeout)
    if args.command == "qmp":
        return qmp(args.socket, args.qmp_command)
    if args.command == "ovf-iso":
        return ovf_iso(args.iso, args.properties, args.mac)
    print(free_port())
    return 0


if __name__ == "__main__":
    sys.exit(main())
