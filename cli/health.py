"""``fedhead health``: is this container's SuperLink or SuperNode serving? For a
container's HEALTHCHECK and a Kubernetes probe, which need one command and an exit code."""

from __future__ import annotations

import argparse
import os
import ssl
import urllib.error
import urllib.request

from fedhead.cli.types import Subparsers, add_command
from fedhead.common.errors import ConfigError, FederationError
from fedhead.common.telemetry import DEFAULT_SERVER_ADDRESS, DEFAULT_SITE_ADDRESS

URL_ENV = "FEDHEAD_HEALTH_URL"
CA_ENV = "FEDHEAD_HEALTH_CA"
# Without a URL: the metrics exporter that `fedhead superlink` / `fedhead node` run by default.
DEFAULT_URLS = (
    f"http://{DEFAULT_SERVER_ADDRESS}/metrics",
    f"http://{DEFAULT_SITE_ADDRESS}/metrics",
)


def probe(url: str, context: ssl.SSLContext | None, timeout: float) -> str | None:
    """None when ``url`` answers 2xx, else why not (one short phrase)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return str(reason)
    return None if 200 <= status < 300 else f"HTTP {status}"


def _health(args: argparse.Namespace) -> int:
    """exit 0 if this machine's SuperLink or SuperNode answers (container health check)

    Fetches each URL (default: the URLs in $FEDHEAD_HEALTH_URL, else the default metrics
    exporters of `fedhead superlink` and `fedhead node`) and exits 0 when they answer with
    2xx. Useful URLs: the exporter's /metrics, the SuperLink's and the SuperNode's /health.
    """
    urls = args.url or os.environ.get(URL_ENV, "").split()
    problems = [
        f"{u!r} is not an http:// or https:// URL"
        for u in urls
        if not u.startswith(("http://", "https://"))
    ]
    if problems:
        raise ConfigError(problems, "health check")
    ca = args.ca or os.environ.get(CA_ENV) or None
    context = ssl.create_default_context(cafile=ca) if ca else None
    if urls:  # every URL given must answer
        failed = {u: why for u in urls if (why := probe(u, context, args.timeout)) is not None}
    else:  # one of the default exporters must answer
        failed = {u: why for u in DEFAULT_URLS if (why := probe(u, None, args.timeout))}
        if len(failed) < len(DEFAULT_URLS):
            failed = {}
    if failed:
        raise FederationError(
            "not healthy: " + "; ".join(f"{u}: {why}" for u, why in failed.items()),
            "see the container's log",
        )
    print("healthy")
    return 0


def add_parser(sub: Subparsers) -> None:
    """``fedhead health``."""
    h = add_command(sub, "health", _health)
    h.add_argument("url", nargs="*", help=f"URL(s) that must answer (default ${URL_ENV})")
    h.add_argument("--ca", help=f"CA certificate for https URLs (default ${CA_ENV})")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds per URL (5)")
