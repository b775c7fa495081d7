"""`fedhead app sign` and `fedhead certs --app-signer` checked by Flower's own verifier,
and the proxy configuration checked by nginx itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from flwr.supercore.fab import Fab
from flwr.supernode.cli.flower_supernode import (
    _try_obtain_trusted_entities,
    _validate_public_keys_ed25519,
)
from flwr.supernode.start_client_internal import _verify_fab

from fedhead.cli import app as app_sign
from fedhead.cli import proxy
from fedhead.cli.certs import CertsPlan, create
from fedhead.common.errors import SetupError
from tests.conftest import REPO


def _verifications(sig: app_sign.Signature) -> dict[str, str]:
    """What Flower's SuperLink hands a site for an app fetched with its signatures."""
    entry = {"signature": sig.signature, "signed_at": sig.signed_at}
    return {sig.public_key_id: json.dumps(entry), "valid_license": "Valid"}


def test_signed_app_verifies_with_flowers_check_and_only_with_the_signers_key(
    tmp_path: Path,
) -> None:
    create(CertsPlan(tmp_path / "certs", [], [], app_signer=True))
    create(CertsPlan(tmp_path / "other", [], [], app_signer=True))
    assert (tmp_path / "certs" / "app-signer.key").stat().st_mode & 0o777 == 0o600
    trusted = _try_obtain_trusted_entities(tmp_path / "certs" / "trusted-entities.yaml")
    others = _try_obtain_trusted_entities(tmp_path / "other" / "trusted-entities.yaml")
    assert trusted is not None and others is not None
    _validate_public_keys_ed25519(trusted)  # exits the process if not ed25519

    key = app_sign.load_signing_key(tmp_path / "certs" / "app-signer.key")
    sig = app_sign.sign(REPO, key, tmp_path / "signed")
    assert sig.app_id == "@fedhead/fedhead"
    assert app_sign.Signature.read(tmp_path / "signed") == sig
    fab = (tmp_path / "signed" / app_sign.FAB_NAME).read_bytes()

    assert _verify_fab(Fab(sig.sha256, fab, _verifications(sig)), trusted)
    assert not _verify_fab(Fab(sig.sha256, fab, _verifications(sig)), others)
    tampered = fab[:-1] + bytes([fab[-1] ^ 1])
    assert not _verify_fab(Fab(sig.sha256, tampered, _verifications(sig)), trusted)

    with pytest.raises(SetupError, match="overwrite"):
        app_sign.sign(REPO, key, tmp_path / "signed")
    (tmp_path / "signed" / app_sign.FAB_NAME).write_bytes(tampered)
    with pytest.raises(SetupError, match="not the file that was signed"):
        app_sign.Signature.read(tmp_path / "signed")


def test_proxy_configuration_passes_nginx_check(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    create(CertsPlan(certs, ["fl.example.org"], [], app_signer=True))
    proxy.check_loopback_name(certs / "server.crt")  # fedhead certs adds localhost
    key = app_sign.load_signing_key(certs / "app-signer.key")
    app_sign.sign(REPO, key, tmp_path / "signed")
    for signed in (None, tmp_path / "signed"):
        fleet = proxy.prepare("127.0.0.1:9443", "127.0.0.1:8000", certs, signed)
        fleet.check()
        text = fleet.config.read_text()
        assert "{{" not in text and "location /v1/fleet/" in text
        assert text.count("proxy_pass") == 1  # only the Fleet API is forwarded
        assert fleet.app_store_url.startswith("http://127.0.0.1:")
        shutil.rmtree(fleet.run_dir)
    broken = proxy.prepare("127.0.0.1:9443", "127.0.0.1:8000", tmp_path / "missing")
    with pytest.raises(SetupError, match="nginx"):
        broken.check()
    shutil.rmtree(broken.run_dir)
    assert subprocess.run([proxy.nginx_program(), "-v"], capture_output=True).returncode == 0


def test_render_needs_every_field() -> None:
    assert proxy.render("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(ValueError):
        proxy.render("a {{x}} {{y}}", {"x": "1"})
