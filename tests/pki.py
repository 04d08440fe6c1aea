"""Throwaway X.509 material for tests: a CA and leaf certificates made with `cryptography`.

The configuration server's real CA arrives with enrolment; tests need the same shapes
(EC P-256 keys, a CA with basicConstraints, leaves with clientAuth+serverAuth) now.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA on disk that can issue leaves into the same directory."""

    name: str
    cert: Path
    key_obj: ec.EllipticCurvePrivateKey
    cert_obj: x509.Certificate
    directory: Path

    @classmethod
    def create(cls, directory: Path, name: str = "Secondsite Test CA") -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{_slug(name)}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(name, path, key, cert, directory)

    def issue(self, common_name: str, *, days: int = 7, not_before_days: int = 0) -> Leaf:
        """A leaf for `common_name`, valid for localhost/127.0.0.1 as a server too."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC) + dt.timedelta(days=not_before_days)
        sans: list[x509.GeneralName] = [
            x509.DNSName(common_name),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert_obj.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key_obj, hashes.SHA256())
        )
        stem = self.directory / f"{_slug(self.name)}-{_slug(common_name)}"
        crt, pem = stem.with_suffix(".crt"), stem.with_suffix(".key")
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.touch(mode=0o600)
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Leaf(crt, pem)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
