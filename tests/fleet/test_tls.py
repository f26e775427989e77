"""TLS material: a local CA and a server certificate for the names asked for, keys 0600,
kept across runs, re-issued when the names change; an operator's own pair is checked."""
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleetctl.errors import ConfigError
from fleetctl.tls import FFDHE2048_PEM, certificate_names, ensure_tls


def test_local_ca_issues_a_server_certificate_for_the_names_asked_for(tmp_path):
    paths = ensure_tls(tmp_path, ["localhost", "127.0.0.1", "llm.example.com"])
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    server = x509.load_pem_x509_certificate(paths.cert.read_bytes())

    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sorted(certificate_names(paths.cert)) == ["127.0.0.1", "llm.example.com", "localhost"]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert paths.dhparam.read_bytes() == FFDHE2048_PEM


def test_private_keys_are_readable_by_the_owner_only(tmp_path):
    paths = ensure_tls(tmp_path, ["localhost"])
    for key in (paths.key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_rerun_keeps_everything_and_new_names_reissue_only_the_server_certificate(tmp_path):
    first = ensure_tls(tmp_path, ["localhost", "127.0.0.1"])
    ca_pem, cert_pem = first.ca.read_bytes(), first.cert.read_bytes()

    again = ensure_tls(tmp_path, ["127.0.0.1", "localhost"])
    assert (again.ca.read_bytes(), again.cert.read_bytes()) == (ca_pem, cert_pem)

    more = ensure_tls(tmp_path, ["localhost", "127.0.0.1", "10.0.0.7"])
    assert more.ca.read_bytes() == ca_pem  # clients that trust the CA keep working
    assert more.cert.read_bytes() != cert_pem
    assert "10.0.0.7" in certificate_names(more.cert)


def test_operator_certificate_and_key_are_used_as_given(tmp_path):
    own = ensure_tls(tmp_path / "own", ["own.example"])
    paths = ensure_tls(tmp_path / "state", ["ignored"], cert=str(own.cert), key=str(own.key))
    assert (paths.cert, paths.key, paths.ca) == (own.cert.resolve(), own.key.resolve(), None)
    assert not (tmp_path / "state" / "ca.pem").exists()


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path):
    own = ensure_tls(tmp_path / "own", ["own.example"])
    other_key = tmp_path / "other.key"
    other_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="does not belong"):
        ensure_tls(tmp_path / "state", ["x"], cert=str(own.cert), key=str(other_key))
    with pytest.raises(ConfigError, match="does not exist"):
        ensure_tls(tmp_path / "state", ["x"], cert=str(tmp_path / "missing.pem"), key=str(other_key))
