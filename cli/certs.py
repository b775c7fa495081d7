"""Key material for a federation, made with ``cryptography``: a private CA, the
SuperLink's TLS certificate, and one EC P-384 key pair per site for node authentication.

Layout of the folder (private keys 0600, the folder 0700)::

    ca.crt  ca.key           the federation's certificate authority
    server.crt  server.key   the SuperLink's certificate (SANs: the hosts given)
    sites/<name>.key         a site's private key (OpenSSH format, for its SuperNode)
    sites/<name>.pub         its public key (OpenSSH format, registered at the SuperLink)
    app-signer.key           the operator's ed25519 key that signs the app (--app-signer)
    trusted-entities.yaml    its public key, for every site's ``fedhead node --trusted-entities``

Sites receive ``ca.crt``, ``trusted-entities.yaml`` and their own ``.key``; nothing else
leaves the operator, and ``app-signer.key`` is best kept off the SuperLink's machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import ConfigError, SetupError
from fedhead.common.files import atomic_writer

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
CURVE = ec.SECP384R1()


@dataclass
class CertsPlan:
    """What one ``fedhead certs`` call will write, checked before anything is written."""

    out: Path
    hosts: list[str]
    sites: list[str]
    days: int = 825
    force: bool = False
    app_signer: bool = False
    renew_server: bool = False  # replace server.crt/key only, signed by the existing CA
    created: list[Path] = field(default_factory=list)

    def check(self) -> None:
        problems = []
        for site in self.sites:
            if not _SITE_NAME.match(site):
                problems.append(f"--site: {site!r} must be letters, digits, '.', '_' or '-'")
        if len(set(self.sites)) != len(self.sites):
            problems.append("--site: names must be unique")
        for host in self.hosts:
            if not _is_ip(host) and not _HOST_NAME.match(host):
                problems.append(f"--host: {host!r} is neither an IP address nor a host name")
        if not 1 <= self.days <= 3650:
            problems.append(f"--days: must be between 1 and 3650 (got {self.days})")
        if not self.hosts and not self.sites and not self.app_signer:
            problems.append(
                "nothing to create: give --host for the SuperLink, --site and/or --app-signer"
            )
        if self.renew_server and not self.hosts:
            problems.append("--renew-server: give the SuperLink's --host name(s) again")
        if problems:
            raise ConfigError(problems, "certs options")
        if self.renew_server and not (self.out / "ca.key").exists():
            raise SetupError(
                f"--renew-server needs the existing CA in {self.out} (ca.crt and ca.key)",
                "a new CA would lock out every site; restore the CA files",
            )
        renewed = {self.out / "server.crt", self.out / "server.key"} if self.renew_server else set()
        existing = [p for p in self._targets() if p.exists() and p not in renewed]
        if existing and not self.force:
            raise SetupError(
                f"refusing to overwrite {', '.join(str(p) for p in existing)}",
                "--site NAME alone adds a site, --renew-server --host ... replaces only the "
                "server certificate; --force replaces these files (their users need new ones)",
            )

    def _targets(self) -> list[Path]:
        targets = []
        if self.hosts:
            targets += [self.out / "server.crt", self.out / "server.key"]
        for site in self.sites:
            targets += [self.out / "sites" / f"{site}.key", self.out / "sites" / f"{site}.pub"]
        if self.app_signer:
            targets += [self.out / "app-signer.key", self.out / "trusted-entities.yaml"]
        return targets


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _write(plan: CertsPlan, path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path.parent, 0o700)
    with atomic_writer(path, mode=0o600 if private else 0o644) as f:
        f.write(data)
    plan.created.append(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhead federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_or_create_ca(plan: CertsPlan) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    crt, key = plan.out / "ca.crt", plan.out / "ca.key"
    if crt.exists() and key.exists():
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SetupError(f"{key} is not an EC private key", "move it away and run again")
        return loaded, x509.load_pem_x509_certificate(crt.read_bytes())
    if crt.exists() or key.exists():
        raise SetupError(
            f"only one of {crt} and {key} exists",
            "restore the other or remove both to make a new CA",
        )
    ca_key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedhead federation CA"))
        .issuer_name(_name("fedhead federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(
        plan,
        key,
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    _write(plan, crt, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return ca_key, ca_cert


def _server_cert(
    plan: CertsPlan, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> None:
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    # The loopback names too: the operator's tools, Flower's own helpers and the proxy
    # in front of the SuperLink reach it on 127.0.0.1 / localhost.
    hosts = [*plan.hosts, *(h for h in ("localhost", "127.0.0.1") if h not in plan.hosts)]
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(plan.hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=plan.days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(
        plan,
        plan.out / "server.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    _write(plan, plan.out / "server.crt", cert.public_bytes(serialization.Encoding.PEM), False)


def _site_keys(plan: CertsPlan, site: str) -> None:
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(plan, plan.out / "sites" / f"{site}.key", private, private=True)
    _write(
        plan, plan.out / "sites" / f"{site}.pub", public + f" fedhead-site:{site}\n".encode(), False
    )


def _app_signer(plan: CertsPlan) -> None:
    from fedhead.cli.app import trusted_entities_yaml

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write(plan, plan.out / "app-signer.key", private, private=True)
    _write(plan, plan.out / "trusted-entities.yaml", trusted_entities_yaml(key.public_key()), False)


def create(plan: CertsPlan) -> list[Path]:
    """Create what the plan asks for; returns the files written."""
    plan.check()
    plan.out.mkdir(parents=True, exist_ok=True)
    os.chmod(plan.out, 0o700)
    if plan.hosts:
        ca_key, ca_cert = _load_or_create_ca(plan)
        _server_cert(plan, ca_key, ca_cert)
    for site in plan.sites:
        _site_keys(plan, site)
    if plan.app_signer:
        _app_signer(plan)
    return plan.created


def certificate_problem(path: Path, warn_days: int = 30) -> tuple[bool, str] | None:
    """``(expired, line)`` when the certificate at ``path`` has expired or expires within
    ``warn_days`` days, else None."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    now = dt.datetime.now(dt.UTC)
    end = cert.not_valid_after_utc
    renew = "renew it with `fedhead certs --renew-server --host NAME ...` (sites keep ca.crt)"
    if end <= now:
        return True, f"the certificate {path} expired on {end:%Y-%m-%d}; {renew}"
    if end - now <= dt.timedelta(days=warn_days):
        days = (end - now).days
        return False, f"the certificate {path} expires in {days} day(s) ({end:%Y-%m-%d}); {renew}"
    return None


def _certs(args: argparse.Namespace) -> int:
    """create the federation's CA, SuperLink certificate and site keys

    Creates (with `cryptography`) a private CA, a TLS certificate for the SuperLink naming
    the given hosts, and an EC P-384 key pair per site for node authentication (OpenSSH
    format). Private keys are written 0600. Existing files are never overwritten without
    --force; an existing CA is reused. Add a site later with --site NAME alone; renew the
    SuperLink certificate with --renew-server --host.
    """
    out = Path(args.out).expanduser()
    plan = CertsPlan(out, args.host or [], args.site or [], args.days, args.force, args.app_signer)
    plan.renew_server = args.renew_server
    written = create(plan)
    for path in written:
        print(f"wrote {path}")
    if args.host:
        print(
            f"\nSuperLink: fedhead superlink --certs-dir {out} --public-address 0.0.0.0:9443\n"
            f"Give every site {out / 'ca.crt'} (public) and its own sites/<name>.key (secret)."
        )
    if args.app_signer:
        print(
            f"sign the app: fedhead app sign --key {out / 'app-signer.key'} --out signed-app\n"
            f"Give every site {out / 'trusted-entities.yaml'} (fedhead node --trusted-entities)."
        )
    for site in args.site or []:
        print(
            f"register {site}: flwr supernode register {out / 'sites' / (site + '.pub')} "
            f"<federation>"
        )
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead certs``."""
    c = add_command(sub, "certs", _certs)
    c.add_argument("--out", default="certs", help="folder for the files (default certs)")
    c.add_argument("--host", action="append", help="SuperLink DNS name or IP (repeatable)")
    c.add_argument("--site", action="append", help="a site to make a key pair for (repeatable)")
    c.add_argument(
        "--app-signer",
        action="store_true",
        help="also create the ed25519 key that signs the app, and the sites' trusted-entities.yaml",
    )
    c.add_argument("--days", type=int, default=825, help="server certificate validity (825)")
    c.add_argument(
        "--renew-server",
        action="store_true",
        help="replace only the SuperLink certificate (same CA: sites need nothing new)",
    )
    c.add_argument("--force", action="store_true", help="replace existing server/site files")
