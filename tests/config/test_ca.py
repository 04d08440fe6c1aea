"""The certificate authority: creation, reopening, damage, and what a signed leaf carries."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.config.ca import CertificateAuthority, CorruptAuthority, serial_hex
from appliance.config.errors import InvalidArgument
from appliance.config.model import ComponentKind
from appliance.wire.enrol import build_csr

SERVER_SANS = ["ps1.example.test", "localhost", "127.0.0.1", "fd00::7"]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.open_or_create(tmp_path / "ca")


def _csr(name: str, sans: list[str] | None = None) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, build_csr(key, name, sans or [])


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_then_reopened(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.open_or_create(directory, name="Site A CA")
    assert _mode(directory / "ca.key") == 0o600
    assert _mode(directory) == 0o700
    assert first.ca_path == directory / "ca.crt"
    assert first.ca_path.read_bytes() == first.ca_pem

    cert = x509.load_pem_x509_certificate(first.ca_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Site A CA"
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.verify_directly_issued_by(cert)  # self-signed

    again = CertificateAuthority.open_or_create(directory, name="ignored on reopen")
    assert again.ca_pem == first.ca_pem
    # The reopened CA signs with the same key: its leaves chain to the first certificate.
    _, csr = _csr("agent1")
    issued = again.sign_csr(csr, name="agent1", kind=ComponentKind.AGENT, sans=[])
    x509.load_pem_x509_certificate(issued.cert_pem).verify_directly_issued_by(cert)


def test_mismatched_pair_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.open_or_create(tmp_path / "a")
    CertificateAuthority.open_or_create(tmp_path / "b")
    (tmp_path / "a" / "ca.crt").write_bytes((tmp_path / "b" / "ca.crt").read_bytes())
    with pytest.raises(CorruptAuthority, match="do not belong together"):
        CertificateAuthority.open_or_create(tmp_path / "a")


def test_garbage_and_half_written_directories_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.open_or_create(directory)
    (directory / "ca.key").write_bytes(b"not a key")
    with pytest.raises(CorruptAuthority, match="cannot read"):
        CertificateAuthority.open_or_create(directory)
    (directory / "ca.key").unlink()
    with pytest.raises(CorruptAuthority, match=r"ca\.key does not"):
        CertificateAuthority.open_or_create(directory)
    # Nothing was replaced behind the operator's back.
    assert not (directory / "ca.key").exists()


def test_agent_leaf_is_client_only(ca: CertificateAuthority) -> None:
    key, csr = _csr("web01.example.test", ["web01.example.test"])
    issued = ca.sign_csr(csr, name="web01.example.test", kind=ComponentKind.AGENT, sans=[])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.serial == serial_hex(cert)
    assert issued.not_after == cert.not_valid_after_utc.timestamp()
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ou] == ["agent"]


def test_server_leaf_has_both_usages_and_its_sans(ca: CertificateAuthority) -> None:
    _, csr = _csr("ps1", SERVER_SANS)
    issued = ca.sign_csr(csr, name="ps1", kind=ComponentKind.PROCESS, sans=SERVER_SANS)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert set(_eku(cert)) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ps1.example.test", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "fd00::7"]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    # A leaf never outlives its CA.
    assert cert.not_valid_after_utc <= ca.certificate.not_valid_after_utc


def test_admin_leaf_is_client_only(ca: CertificateAuthority) -> None:
    _, csr = _csr("lab-admin")
    issued = ca.sign_csr(csr, name="lab-admin", kind=ComponentKind.ADMIN, sans=[])
    assert _eku(x509.load_pem_x509_certificate(issued.cert_pem)) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_csr_for_another_name_is_refused(ca: CertificateAuthority) -> None:
    _, csr = _csr("someone-else")
    with pytest.raises(InvalidArgument, match="common name"):
        ca.sign_csr(csr, name="agent1", kind=ComponentKind.AGENT, sans=[])


@pytest.mark.parametrize("san", ["*.example.test", "UPPER.example", "a..b", "-x.test", "", "x_y"])
def test_bad_san_is_refused(ca: CertificateAuthority, san: str) -> None:
    _, csr = _csr("ts1")
    with pytest.raises(InvalidArgument, match="invalid server name"):
        ca.sign_csr(csr, name="ts1", kind=ComponentKind.TARGET, sans=[san])


@pytest.mark.parametrize("name", ["", "Agent1", "-agent", "a" * 64, "agent 1", "agent/1"])
def test_bad_name_is_refused(ca: CertificateAuthority, name: str) -> None:
    _, csr = _csr("agent1")
    with pytest.raises(InvalidArgument, match="invalid component name"):
        ca.sign_csr(csr, name=name, kind=ComponentKind.AGENT, sans=[])


def test_unreadable_or_forged_csr_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidArgument, match="not a valid PEM"):
        ca.sign_csr(b"hello", name="agent1", kind=ComponentKind.AGENT, sans=[])
    # A CSR whose signature does not verify (a bit of the signature flipped).
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(
        x509.load_pem_x509_csr(build_csr(key, "agent1", [])).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-5] ^= 0x01
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidArgument, match="signature"):
        ca.sign_csr(pem, name="agent1", kind=ComponentKind.AGENT, sans=[])


def test_small_curve_is_refused(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(InvalidArgument, match="curve"):
        ca.sign_csr(build_csr(key, "agent1", []), name="agent1", kind=ComponentKind.AGENT, sans=[])


def test_issue_local_writes_a_working_pair(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_path, key_path = ca.issue_local(
        "configd", ComponentKind.PROCESS, ["localhost", "127.0.0.1"], tmp_path / "tls"
    )
    assert (cert_path.name, key_path.name) == ("configd.crt", "configd.key")
    assert _mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.certificate)
    assert ExtendedKeyUsageOID.SERVER_AUTH in _eku(cert)
