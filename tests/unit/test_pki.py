"""The mesh's own small CA: what it writes, with which modes and names, and when it renews."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from warren_mesh.identity import pki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_writes_a_ca_etcd_admin_and_operator_with_private_keys_0600(tmp_path: Path) -> None:
    written = pki.init(tmp_path, ["127.0.0.1", "etcd.example"])
    ca = _cert(written["ca"].cert)
    for name, user in (("etcd", "etcd"), ("admin", "root"), ("operator", "warren-mesh-operator")):
        cert = _cert(written[name].cert)
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == user
        assert stat.S_IMODE(written[name].key.stat().st_mode) == 0o600
    assert stat.S_IMODE(written["ca"].key.stat().st_mode) == 0o600
    etcd = _cert(written["etcd"].cert)
    names = etcd.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["etcd.example"]
    usages = etcd.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    admin_usages = _cert(written["admin"].cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH not in admin_usages and ExtendedKeyUsageOID.CLIENT_AUTH in admin_usages
    with pytest.raises(pki.PkiError, match="already holds a CA"):
        pki.init(tmp_path, ["127.0.0.1"])


def test_node_certificates_carry_the_nodes_user_and_renew_only_when_due(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="certs init"):
        pki.issue_node(tmp_path, "n1")
    pki.init(tmp_path, ["127.0.0.1"])
    node = pki.issue_node(tmp_path, "n1")
    assert _cert(node.cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-n1"
    assert pki.renew_node(tmp_path, "n1") is None, "a fresh certificate is not renewed"
    first = node.cert.read_bytes()
    renewed = pki.renew_node(tmp_path, "n1", within_days=400)  # valid 365 days: due within 400
    assert renewed is not None and renewed.cert.read_bytes() != first
    assert stat.S_IMODE(renewed.key.stat().st_mode) == 0o600


def test_credential_problems_are_found_before_etcd_is_asked(tmp_path: Path) -> None:
    pki.init(tmp_path, ["127.0.0.1"])
    good = pki.issue_node(tmp_path, "n1")
    assert pki.credential_problem(good.cert, good.key) is None
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    old = pki.issue(tmp_path, "old", "node-old", not_before=past, days=1)
    assert "expired on" in (pki.credential_problem(old.cert, old.key) or "")
    future = pki.issue(tmp_path, "new", "node-new", not_before=past + datetime.timedelta(days=20))
    assert "not valid before" in (pki.credential_problem(future.cert, future.key) or "")
    other = pki.issue_node(tmp_path, "n2")
    assert "is not the key of" in (pki.credential_problem(good.cert, other.key) or "")
    assert "not a PEM certificate" in (pki.credential_problem(good.key, good.key) or "")
    assert "not an unencrypted PEM private key" in (pki.credential_problem(good.cert, good.cert) or "")


def test_a_request_whose_key_is_no_point_of_its_curve_is_refused_as_a_bad_request(tmp_path: Path) -> None:
    # Found by an attacker's request: such a key escaped as ValueError, and the enroller answered 500, not 400.
    pki.init_ca(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    good = pki.certificate_request(key)
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    der = x509.load_pem_x509_csr(good).public_bytes(Encoding.DER)
    assert der.count(point) == 1
    off_curve = point[:-1] + bytes([point[-1] ^ 1])  # the same x, a y that does not solve the curve's equation
    bad = x509.load_der_x509_csr(der.replace(point, off_curve)).public_bytes(Encoding.PEM)
    with pytest.raises(pki.PkiError, match="not a valid public key"):
        pki.sign_request(tmp_path, bad, "node-evil")
    assert pki.sign_request(tmp_path, good, "node-n1").startswith(b"-----BEGIN CERTIFICATE-----")
