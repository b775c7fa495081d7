"""``fedhead app sign``: the operator signs the Flower App that sites will run.

A site started with ``--trusted-entities`` runs only an app (FAB) whose SHA-256 carries
an ed25519 signature by one of its trusted keys. Flower checks the signature on the
site (its SuperNode, before any app code is installed); in open-source Flower 1.41 a
signature reaches the site only with an app the SuperLink fetched from an app store,
never with one uploaded by ``flwr run <folder>``. So the operator builds and signs the
FAB here, ``fedhead superlink --signed-app DIR`` serves it to its SuperLink as that
store (loopback only), and runs start with ``flwr run @<publisher>/<name> <federation>``.

The signature is Flower's format (flwr/supercore/primitives/asymmetric_ed25519.py):
ed25519 over 8 bytes of big-endian ``signed_at`` followed by the FAB's SHA-256 digest,
base64url without padding.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedhead.cli.types import Subparsers, add_command, add_group
from fedhead.common.errors import ConfigError, SetupError
from fedhead.common.files import atomic_writer

FAB_NAME = "app.fab"
SIGNATURE_NAME = "signature.json"


def public_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A stable name for a signing key: the one a site's trusted-entities file lists."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def trusted_entities_yaml(public_key: ed25519.Ed25519PublicKey) -> bytes:
    """The YAML that ``flower-supernode --trusted-entities`` reads: key id -> public key."""
    openssh = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    # A JSON string is a valid YAML double-quoted scalar.
    return f"{public_key_id(public_key)}: {json.dumps(openssh)}\n".encode()


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise SetupError(
            f"cannot read the signing key {path} ({err})",
            "create one with `fedhead certs --app-signer`",
        ) from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SetupError(
            f"{path} is not an ed25519 key", "create one with `fedhead certs --app-signer`"
        )
    return key


@dataclass(frozen=True)
class Signature:
    """What ``fedhead app sign`` writes beside the FAB (signature.json)."""

    app_id: str  # "@publisher/name", the spec for `flwr run`
    version: str
    sha256: str
    public_key_id: str
    signature: str  # base64url, no padding
    signed_at: int

    @classmethod
    def read(cls, folder: Path) -> Signature:
        path = folder / SIGNATURE_NAME
        try:
            data = json.loads(path.read_text())
            sig = cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise SetupError(
                f"{path} is missing or not a fedhead app signature ({err})",
                "sign the app with `fedhead app sign`",
            ) from err
        fab = (folder / FAB_NAME).read_bytes() if (folder / FAB_NAME).is_file() else b""
        if hashlib.sha256(fab).hexdigest() != sig.sha256:
            raise SetupError(
                f"{folder / FAB_NAME} is missing or not the file that was signed",
                "sign the app again with `fedhead app sign`",
            )
        return sig


def sign(app: Path, key: ed25519.Ed25519PrivateKey, out: Path, force: bool = False) -> Signature:
    """Build ``app`` into a FAB with Flower's builder and sign its SHA-256."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fab_config, get_metadata_from_config

    if not (app / "pyproject.toml").is_file():
        raise ConfigError([f"--app: {app} has no pyproject.toml (the Flower App's folder)"])
    targets = [out / FAB_NAME, out / SIGNATURE_NAME]
    if not force and any(p.exists() for p in targets):
        raise SetupError(f"refusing to overwrite {out}", "pass --force or choose another --out")
    fab = build_fab_from_disk(app)
    fab_id, version = get_metadata_from_config(get_fab_config(fab))
    signed_at = int(time.time())
    digest = hashlib.sha256(fab).digest()
    raw = key.sign(signed_at.to_bytes(8, byteorder="big") + digest)
    sig = Signature(
        app_id=f"@{fab_id}",
        version=version,
        sha256=digest.hex(),
        public_key_id=public_key_id(key.public_key()),
        signature=base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"),
        signed_at=signed_at,
    )
    with atomic_writer(out / FAB_NAME) as f:
        f.write(fab)
    with atomic_writer(out / SIGNATURE_NAME) as f:
        f.write((json.dumps(asdict(sig), indent=2) + "\n").encode())
    return sig


def _sign(args: argparse.Namespace) -> int:
    """build the app into a FAB and sign it with the operator's ed25519 key

    Builds the Flower App (Flower's FAB builder) and signs its SHA-256 with an ed25519 key
    from `fedhead certs --app-signer`. Sites whose --trusted-entities list that key run it;
    they refuse unsigned apps. Keep the key off the SuperLink's machine.
    """
    out = Path(args.out).expanduser()
    key = load_signing_key(Path(args.key).expanduser())
    sig = sign(Path(args.app).expanduser().resolve(), key, out, args.force)
    print(f"wrote {out / FAB_NAME} (sha256 {sig.sha256}) and {out / SIGNATURE_NAME}")
    print(
        f"serve it: fedhead superlink ... --signed-app {out}\n"
        f"run it:   flwr run {sig.app_id} <federation> --stream"
    )
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead app sign``."""
    app_sub = add_group(
        sub, "app", help="sign the Flower App that sites will run", metavar="COMMAND"
    )
    s = add_command(app_sub, "sign", _sign)
    s.add_argument("--key", required=True, help="ed25519 private key (OpenSSH format)")
    s.add_argument("--app", default=".", help="the Flower App's folder (default .)")
    s.add_argument("--out", default="signed-app", help="folder for app.fab and signature.json")
    s.add_argument("--force", action="store_true", help="replace an earlier signed app")
