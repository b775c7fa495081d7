"""The nginx listener in front of a SuperLink that forwards only the Fleet API.

The SuperLink serves its Fleet, Control and runtime APIs on one port; sites get the
address of this proxy instead (deploy/nginx/fleet-proxy.conf), so holders of ca.crt or
of a site key reach only what a SuperNode needs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedhead.cli.preflight import parse_address
from fedhead.common.errors import SetupError
from fedhead.common.files import atomic_writer

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "fleet-proxy.conf"
_FIELD = re.compile(r"\{\{(\w+)\}\}")
_EMERG = re.compile(r"\[emerg\] [0-9#]+: (.*)")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def nginx_program() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    if found is None:
        raise SetupError(
            "nginx is not installed (needed for --public-address)",
            "install your distribution's nginx package (Debian: apt-get install nginx)",
        )
    return found


def render(template: str, fields: dict[str, str]) -> str:
    """Fill the ``{{name}}`` fields; every field must be given and used."""
    used = set(_FIELD.findall(template))
    if used != set(fields):
        raise ValueError(f"template fields {sorted(used)} != given {sorted(fields)}")
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


@dataclass(frozen=True)
class FleetProxy:
    """An nginx configuration written to a private folder, ready to run."""

    config: Path
    run_dir: Path
    app_store_url: str  # for the SuperLink's FLWR_SUPERGRID_API_URL

    def command(self) -> list[str]:
        prefix = str(self.run_dir)
        return [nginx_program(), "-p", prefix, "-e", "stderr", "-c", str(self.config)]

    def check(self) -> None:
        """``nginx -t``: a bad certificate, address or directive is reported before start."""
        result = subprocess.run(
            [*self.command(), "-t"], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            found = _EMERG.search(result.stderr)
            detail = found.group(1) if found else result.stderr.strip()
            raise SetupError(
                f"the Fleet API proxy (nginx) would not start: {detail}",
                "check --public-address and the files in --certs-dir",
            )


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_store_answer(signed_app: Path | None, store: str) -> tuple[str, str, bytes]:
    """(status, JSON answer to fetch-fab, the FAB) in the shape Flower's SuperLink reads."""
    import hashlib

    from fedhead.cli.app import FAB_NAME, Signature

    if signed_app is None:
        return "404", json.dumps({"detail": "no signed app is served"}), b""
    sig = Signature.read(signed_app)
    fab = (signed_app / FAB_NAME).read_bytes()
    if hashlib.sha256(fab).hexdigest() != sig.sha256:
        raise SetupError(f"{signed_app / FAB_NAME} changed while reading it", "start again")
    verification = {
        "public_key_id": sig.public_key_id,
        "signature": sig.signature,
        "signed_at": sig.signed_at,
    }
    answer = {"fab_url": f"http://{store}/v1/hub/app.fab", "verifications": [verification]}
    text = json.dumps(answer)
    if "'" in text or "$" in text or "\\" in text:  # never, for the fields above
        raise SetupError(f"{signed_app}: unexpected characters in the signature", "sign again")
    return "200", text, fab


def prepare(
    public_address: str, upstream: str, certs: Path, signed_app: Path | None = None
) -> FleetProxy:
    """Write the proxy's configuration for ``public_address`` -> ``upstream`` (the SuperLink)
    and the loopback store that serves ``signed_app`` to the SuperLink."""
    parse_address(public_address)  # ConfigError for a malformed address
    store = f"127.0.0.1:{_free_loopback_port()}"
    status, answer, fab = _app_store_answer(signed_app, store)
    if not TEMPLATE.is_file():
        raise SetupError(
            f"{TEMPLATE} is missing",
            "run fedhead from its repository checkout (deploy/install.sh installs it so)",
        )
    run_dir = Path(tempfile.mkdtemp(prefix="fedhead-proxy-"))
    if fab:
        # nginx's workers serve the FAB; started as root they run as another user, so
        # the folder may be crossed (not listed) and the FAB, which every site
        # receives anyway, read by them. The configuration stays private (0600).
        run_dir.chmod(0o711)
        with atomic_writer(run_dir / "app.fab", mode=0o644) as f:
            f.write(fab)
    fields = {
        "run_dir": str(run_dir),
        "public_address": public_address,
        "server_cert": str((certs / "server.crt").resolve()),
        "server_key": str((certs / "server.key").resolve()),
        "ca_cert": str((certs / "ca.crt").resolve()),
        "upstream": upstream,
        "app_store_address": store,
        "app_store_status": status,
        "app_store_answer": answer,
    }
    config = run_dir / "nginx.conf"
    with atomic_writer(config, mode=0o600) as f:
        f.write(render(TEMPLATE.read_text(), fields).encode())
    return FleetProxy(config, run_dir, f"http://{store}/v1")


def check_loopback_name(server_cert: Path) -> None:
    """The proxy checks the SuperLink's certificate under the name ``localhost``."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if "localhost" not in names.get_values_for_type(x509.DNSName):
        raise SetupError(
            f"{server_cert} does not name localhost, under which the proxy reaches the SuperLink",
            "re-create it with `fedhead certs --force --host ...` (it adds localhost)",
        )
