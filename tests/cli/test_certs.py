"""`fedhead certs`: adding a site and renewing the SuperLink certificate later, and
`fedhead superlink` refusing an expired certificate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhead.cli.certs import CertsPlan, certificate_problem, create
from fedhead.common.errors import ConfigError, SetupError
from tests.cli.test_cli import fedhead, one_line_error


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _federation(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    create(CertsPlan(out, ["127.0.0.1"], ["site-a"]))
    return out


def _verifies(cert_path: Path, ca_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    return True


def test_a_site_added_later_leaves_the_server_and_other_sites_alone(tmp_path: Path) -> None:
    out = _federation(tmp_path)
    before = _snapshot(out)
    written = create(CertsPlan(out, [], ["site-b"]))
    assert sorted(p.name for p in written) == ["site-b.key", "site-b.pub"]
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before  # nothing existing changed
    with pytest.raises(SetupError, match="--site NAME alone adds a site"):
        create(CertsPlan(out, ["127.0.0.1"], ["site-c"]))  # would replace server.crt


def test_renew_server_replaces_only_the_server_certificate(tmp_path: Path) -> None:
    out = _federation(tmp_path)
    before = _snapshot(out)
    written = create(CertsPlan(out, ["127.0.0.1", "fl.example.org"], [], renew_server=True))
    assert sorted(p.name for p in written) == ["server.crt", "server.key"]
    after = _snapshot(out)
    assert (
        after["server.crt"] != before["server.crt"] and after["server.key"] != before["server.key"]
    )
    for name in ("ca.crt", "ca.key", "sites/site-a.key", "sites/site-a.pub"):
        assert after[name] == before[name], name
    assert _verifies(out / "server.crt", out / "ca.crt")  # sites keep their ca.crt
    assert certificate_problem(out / "server.crt") is None


def test_renew_server_needs_the_existing_ca_and_the_hosts(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="needs the existing CA"):
        create(CertsPlan(tmp_path / "empty", ["127.0.0.1"], [], renew_server=True))
    with pytest.raises(ConfigError, match="--renew-server"):
        create(CertsPlan(_federation(tmp_path), [], [], renew_server=True))


def _reissue(out: Path, not_after: dt.datetime) -> None:
    """Replace server.crt by one the CA signed with another end date."""
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    old = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=400))
        .not_valid_after(not_after)
        .sign(ca_key, hashes.SHA384())
    )
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_superlink_refuses_an_expired_certificate_and_warns_before(tmp_path: Path) -> None:
    out = _federation(tmp_path)
    now = dt.datetime.now(dt.UTC)
    _reissue(out, now - dt.timedelta(days=1))
    result = fedhead("superlink", "--certs-dir", str(out), "--dry-run")
    one_line_error(result, SetupError.exit_code, "expired", "--renew-server")

    _reissue(out, now + dt.timedelta(days=10))
    result = fedhead("superlink", "--certs-dir", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "expires in" in result.stderr and "--renew-server" in result.stderr
    assert "--ssl-certfile" in result.stdout

    create(CertsPlan(out, ["127.0.0.1"], [], renew_server=True))
    result = fedhead("superlink", "--certs-dir", str(out), "--dry-run")
    assert result.returncode == 0 and "expires" not in result.stderr, result.stderr
