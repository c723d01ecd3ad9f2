"""A small certificate authority for meshes without a PKI of their own: etcd's server certificate and the client
certificates of the admin, the operator and each node, whose common name is the etcd user it logs in as.

Keys are ECDSA P-256, written once with mode 0600 and never printed; certificates are PEM files beside them. A
node's certificate is renewed (same name, new key) when it is about to expire. Layout of a PKI directory:

    ca.pem  ca-key.pem                  the authority (keep ca-key.pem off the nodes)
    etcd.pem  etcd-key.pem              etcd's server certificate, for the given names and addresses
    admin.pem  admin-key.pem            CN root: everything (etcdctl, warren-mesh status, the lab)
    operator.pem  operator-key.pem      CN warren-mesh-operator
    node-NAME.pem  node-NAME-key.pem    CN node-NAME: one node (or made on the node: warren-mesh enroll)
    enroller.pem  enroller-key.pem      the enroller's HTTPS certificate (warren-mesh certs enroller)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "warren-mesh CA"
ADMIN_USER = "root"  # etcd's built-in superuser: auth needs it, and the admin certificate logs in as it
OPERATOR_USER = "warren-mesh-operator"
ENROLLER_USER = "warren-mesh-enroller"  # its server certificate's name; it acts in etcd as root (admin.pem)
CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_WITHIN_DAYS = 30


class PkiError(RuntimeError):
    """A PKI directory that cannot be used as asked; the message says what to do."""


def node_user(name: str) -> str:
    """The etcd user (and certificate common name) of node ``name``."""
    return f"node-{name}"


@dataclass(frozen=True, slots=True)
class Credential:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PkiError(f"no usable CA in {directory} ({exc}); create one with `warren-mesh certs init`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca-key.pem'} is not an EC key of this tool's")
    return cert, key


def init_ca(directory: Path) -> Credential:
    """Create the authority in ``directory`` (refused if one is there: its certificates would all become void)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.pem").exists():
        raise PkiError(f"{directory} already holds a CA; issue certificates from it, or use another directory")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital signature, certificate and CRL signing
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / "ca-key.pem", key)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Credential(directory / "ca.pem", directory / "ca-key.pem")


def issue(
    directory: Path,
    stem: str,
    common_name: str,
    *,
    server_names: Iterable[str] = (),
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
) -> Credential:
    """Sign a certificate for ``common_name`` with the CA in ``directory``, written as ``stem.pem`` and
    ``stem-key.pem``. With ``server_names`` (DNS names or IP addresses) it is a server certificate (etcd's),
    otherwise a client certificate. ``not_before`` and ``days`` exist for tests of expired certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _sign(directory, key.public_key(), common_name, server_names=server_names, days=days, not_before=not_before)
    _write_key(directory / f"{stem}-key.pem", key)
    (directory / f"{stem}.pem").write_bytes(cert)
    return Credential(directory / f"{stem}.pem", directory / f"{stem}-key.pem")


def _sign(
    directory: Path,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    *,
    server_names: Iterable[str] = (),
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
) -> bytes:
    """A certificate (PEM) for ``public_key`` as ``common_name``, signed by the CA in ``directory``."""
    ca_cert, ca_key = _load_ca(directory)
    start = not_before or _now() - datetime.timedelta(minutes=5)
    names = list(server_names)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )  # digital signature, key encipherment
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


# --- certificate requests: a key made where it is used, a certificate from whoever holds the CA ----------------


def node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key at ``path``, made (0600) if there is none: a node's key never leaves the node."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{path} is not an EC private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(path, key)
    return key


def certificate_request(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR (PEM) proving possession of ``key``. It names nobody: the signer decides whose it is."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_request(directory: Path, request: bytes, common_name: str) -> bytes:
    """A client certificate (PEM) for the key of ``request`` as ``common_name``: whatever the request says about
    names is ignored. Refused (PkiError): anything but a P-256 key, or a request its key did not sign."""
    try:
        csr = x509.load_pem_x509_csr(request)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate request ({exc})") from None
    try:
        # A point that is not on its curve is refused here, as ValueError: a bad request, not our failure.
        public_key = csr.public_key()
    except ValueError as exc:
        raise PkiError(f"the request's key is not a valid public key ({exc})") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise PkiError("the request's key is not an ECDSA P-256 key")
    if not csr.is_signature_valid:
        raise PkiError("the request is not signed by its own key")
    return _sign(directory, public_key, common_name)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def init(directory: Path, etcd_names: Iterable[str]) -> dict[str, Credential]:
    """A new PKI: the CA, etcd's server certificate for ``etcd_names``, and the admin's and operator's."""
    names = list(etcd_names)
    if not names:
        raise PkiError("etcd's certificate needs at least one name or address (--etcd-name)")
    return {
        "ca": init_ca(directory),
        "etcd": issue(directory, "etcd", "etcd", server_names=names),
        "admin": issue(directory, "admin", ADMIN_USER),
        "operator": issue(directory, "operator", OPERATOR_USER),
    }


def issue_node(directory: Path, name: str) -> Credential:
    return issue(directory, node_user(name), node_user(name))


def not_after(cert_path: Path) -> datetime.datetime:
    """When the certificate at ``cert_path`` expires."""
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc


def expires_within(cert_path: Path, days: int) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - _now() < datetime.timedelta(days=days)


def renew_node(directory: Path, name: str, *, within_days: int = RENEW_WITHIN_DAYS) -> Credential | None:
    """Issue node ``name`` a new certificate (and key) if its own expires within ``within_days``; None if not."""
    stem = node_user(name)
    current = directory / f"{stem}.pem"
    if current.exists() and not expires_within(current, within_days):
        return None
    return issue_node(directory, name)


def credential_problem(cert_path: Path, key_path: Path) -> str | None:
    """Why this certificate and key cannot log in to etcd, as far as can be told without asking etcd, or None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"{cert_path} is not a PEM certificate ({exc})"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return f"{key_path} is not an unencrypted PEM private key ({exc})"
    now = _now()
    if cert.not_valid_after_utc < now:
        return f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if key.public_key().public_bytes(*_PUBLIC) != cert.public_key().public_bytes(*_PUBLIC):
        return f"{key_path} is not the key of {cert_path}"
    return None


_PUBLIC = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
