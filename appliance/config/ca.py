"""The configuration server's certificate authority: one EC P-256 CA that signs every leaf.

On disk (the directory is 0700)::

    ca.key   PKCS#8 PEM private key, 0600, never leaves this directory
    ca.crt   the self-signed CA certificate (PEM), what every component trusts

Both are written once by `CertificateAuthority.open_or_create` and only read after
that. A directory holding one without the other, or a key that does not match the
certificate, is refused with `CorruptAuthority` rather than silently replaced: every
enrolled component trusts this exact CA, so a new one would cut them all off.

Leaves are never copied from a CSR: the subject, SANs and extensions come from the
caller (the enrolment exchange), the CSR contributes only its public key, after its
signature, its common name and its key type have been checked.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.config.errors import InvalidArgument
from appliance.config.model import ComponentKind
from appliance.storage.atomic import atomic_write
from appliance.wire.enrol import build_csr, general_name, private_key_pem

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
CLOCK_SKEW = dt.timedelta(minutes=5)  # a peer whose clock lags a little still accepts us
MAX_SANS = 16
# Agents and admin tools only ever connect out; everything else also listens.
_CLIENT_ONLY = frozenset({ComponentKind.AGENT, ComponentKind.ADMIN})


class CorruptAuthority(Exception):
    """The CA directory is damaged (half written, mismatched or unreadable files)."""


@dataclass(frozen=True)
class Issued:
    serial: str  # lowercase hex, as `serial_hex` gives it
    cert_pem: bytes
    not_after: float  # unix time


def serial_hex(cert: x509.Certificate) -> str:
    """The serial number as the inventory stores it (lowercase hex, no padding)."""
    return format(cert.serial_number, "x")


def public_key_fingerprint(public_key: CertificatePublicKeyTypes) -> str:
    """sha256 hex of the SubjectPublicKeyInfo DER: one key, one fingerprint."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid component name {name!r}: use 1-63 lowercase letters, digits, "
            "dots and dashes, starting with a letter or digit"
        )
    return name


def parse_san(text: str) -> x509.GeneralName:
    """A SAN string as an IP address or a DNS name; InvalidArgument for anything else.

    No wildcards: a leaf names the hosts it serves, one by one.
    """
    try:
        return general_name(text)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


def san_strings(names: list[x509.GeneralName]) -> list[str]:
    """Inverse of `parse_san` for the SANs we issue (DNS names and IP addresses)."""
    out = []
    for general in names:
        if isinstance(general, x509.DNSName | x509.IPAddress):
            out.append(str(general.value))
        else:
            raise InvalidArgument(f"unsupported subject alternative name {general!r}")
    return out


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature (InvalidArgument otherwise)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidArgument(f"the CSR is not a valid PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("the CSR's signature does not verify")
    return csr


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    """The CA key and certificate of one configuration server (see the module docstring)."""

    def __init__(
        self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> None:
        self.directory = directory
        self._key = key
        self._cert = cert

    @classmethod
    def open_or_create(
        cls, directory: Path, name: str = "Secondsite CA", days: int = 3650
    ) -> CertificateAuthority:
        """Load the CA in `directory`, creating it (key first, then certificate) if empty."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        if not key_path.exists() and not cert_path.exists():
            return cls._create(directory, name, days)
        if not key_path.exists() or not cert_path.exists():
            present, missing = (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
            raise CorruptAuthority(
                f"{present} exists but {missing} does not: restore {missing.name} from a "
                f"backup, or remove {directory} to start a new CA (every component must "
                "then enrol again)"
            )
        return cls._load(directory, key_path, cert_path)

    @classmethod
    def _create(cls, directory: Path, name: str, days: int) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        # exclusive: two creators racing must not end with one's key and the other's cert.
        atomic_write(directory / KEY_FILE, private_key_pem(key), 0o600, exclusive=True)
        atomic_write(
            directory / CERT_FILE,
            cert.public_bytes(serialization.Encoding.PEM),
            0o644,
            exclusive=True,
        )
        return cls(directory, key, cert)

    @classmethod
    def _load(cls, directory: Path, key_path: Path, cert_path: Path) -> CertificateAuthority:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise CorruptAuthority(f"cannot read the CA in {directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CorruptAuthority(f"{key_path} is not an EC private key")
        if key.public_key() != cert.public_key():
            raise CorruptAuthority(f"{key_path} and {cert_path} do not belong together")
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca:
            raise CorruptAuthority(f"{cert_path} is not a CA certificate")
        if os.stat(key_path).st_mode & 0o077:
            os.chmod(key_path, 0o600)  # someone loosened it; the key is only ours to read
        return cls(directory, key, cert)

    # -- what the CA shows ----------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def ca_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_der(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.DER)

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    # -- issuing --------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        name: str,
        kind: ComponentKind,
        sans: list[str],
        days: int = 825,
    ) -> Issued:
        """A leaf for the CSR's key, named `name`, with the usages `kind` is allowed.

        Agents and admin tools get clientAuth only and no SANs; servers get
        serverAuth+clientAuth and `sans` (DNS names or IP addresses).
        InvalidArgument for a bad CSR, name, key or SAN.
        """
        check_name(name)
        if len(sans) > MAX_SANS:
            raise InvalidArgument(f"at most {MAX_SANS} server names, got {len(sans)}")
        general_names = [parse_san(san) for san in sans]
        csr = load_csr(csr_pem)
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != name:
            found = ", ".join(repr(a.value) for a in cns) or "none"
            raise InvalidArgument(f"the CSR's common name ({found}) is not {name!r}")
        public_key = csr.public_key()
        _check_key(public_key)

        now = dt.datetime.now(dt.UTC)
        # A leaf must not outlive the CA that vouches for it.
        not_after = min(now + dt.timedelta(days=days), self._cert.not_valid_after_utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                # The kind travels in the certificate so a peer can tell roles apart
                # without asking the inventory.
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind.value),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                False,
            )
        )
        if kind in _CLIENT_ONLY:
            usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        else:
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            if general_names:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(general_names), critical=False
                )
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(
            serial=serial_hex(cert),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def issue_local(
        self, name: str, kind: ComponentKind, sans: list[str], directory: Path
    ) -> tuple[Path, Path]:
        """A fresh key and leaf written to `directory` as <name>.crt and <name>.key (0600).

        For the configuration server's own TLS leaf, and for tests and the lab: the
        same checks and extensions as an enrolled leaf.
        """
        check_name(name)
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            csr = build_csr(key, name, sans)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        issued = self.sign_csr(csr, name=name, kind=kind, sans=sans)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        atomic_write(key_path, private_key_pem(key), 0o600)
        atomic_write(cert_path, issued.cert_pem, 0o644)
        return cert_path, key_path


def _check_key(public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise InvalidArgument(f"unsupported EC curve {public_key.curve.name}")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise InvalidArgument(f"an RSA key of {public_key.key_size} bits is too small")
    else:
        raise InvalidArgument(f"unsupported key type {type(public_key).__name__}")
