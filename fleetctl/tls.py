"""TLS material for NGINX, made with `cryptography`: a local CA and a server certificate.

`ensure_tls` is idempotent: it keeps the CA once made (clients that trust it keep working) and
re-issues the server certificate only when it is missing, expiring within 30 days, issued by
another CA, or lacks a name that was asked for. Private keys are written 0600. An operator's own
certificate and key are checked (they load, and the key matches the certificate) and used as is.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetctl.errors import ConfigError

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=397)  # the longest that browsers accept
RENEW_BEFORE = dt.timedelta(days=30)

# RFC 7919 ffdhe2048, the group Mozilla's intermediate profile asks for with its DHE suites.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class TlsPaths:
    cert: Path  # server certificate chain (PEM)
    key: Path
    dhparam: Path
    ca: Path | None  # the CA clients should trust; None for an operator's own certificate


def planned_paths(tls_dir: Path, cert: str = "", key: str = "") -> TlsPaths:
    """Where the TLS files are (or will be), without creating anything."""
    if cert:
        return TlsPaths(Path(cert).resolve(), Path(key).resolve(), tls_dir / "dhparam.pem", None)
    return TlsPaths(tls_dir / "server.pem", tls_dir / "server.key", tls_dir / "dhparam.pem", tls_dir / "ca.pem")


def ensure_tls(tls_dir: Path, names: list[str], cert: str = "", key: str = "") -> TlsPaths:
    tls_dir.mkdir(parents=True, exist_ok=True)
    dhparam = tls_dir / "dhparam.pem"
    if not dhparam.exists() or dhparam.read_bytes() != FFDHE2048_PEM:
        dhparam.write_bytes(FFDHE2048_PEM)
    if cert:
        check_operator_pair(Path(cert), Path(key))
        return planned_paths(tls_dir, cert, key)
    ca_cert, ca_key = _ensure_ca(tls_dir)
    paths = planned_paths(tls_dir)
    if _server_cert_outdated(paths.cert, ca_cert, names):
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = _issue_server_cert(server_key, ca_cert, ca_key, names)
        _write_key(paths.key, server_key)
        paths.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def check_operator_pair(cert_path: Path, key_path: Path) -> None:
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist; check --tls-cert/--tls-key")
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {cert_path} / {key_path} as PEM ({exc}); "
                          "give an unencrypted PEM key and certificate") from exc
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ConfigError(f"--tls-key {key_path} does not belong to --tls-cert {cert_path}")


def certificate_names(cert_path: Path) -> list[str]:
    """The DNS names and IPs a certificate is valid for (subjectAltName)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + \
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _ensure_ca(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = tls_dir / "ca.pem", tls_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.not_valid_after_utc - _now() > RENEW_BEFORE:
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pagefleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "pagefleet local CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _server_cert_outdated(cert_path: Path, ca_cert: x509.Certificate, names: list[str]) -> bool:
    if not cert_path.exists() or not cert_path.with_suffix(".key").exists():
        return True
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return True
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return True
    return not set(_normalise(names)) <= set(_normalise(certificate_names(cert_path)))


def _issue_server_cert(key, ca_cert, ca_key, names: list[str]) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _write_key(path: Path, key) -> None:
    """Created 0600 from the start: the key is never readable by others, not even briefly."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _normalise(names: list[str]) -> list[str]:
    out = []
    for name in names:
        try:
            out.append(str(ipaddress.ip_address(name)))
        except ValueError:
            out.append(name.lower())
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
