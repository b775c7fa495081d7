"""Real images and containers with podman: a Debian base image made with debootstrap, the
fedhead image and a Prometheus image built on it, and compose projects removed afterwards.

Podman runs rootful with the runc runtime, host networking, explicit ulimits and
``localhost/`` image names: what works on machines without a Docker daemon or a registry.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

BASE_IMAGE = "localhost/fedhead-test-base:bookworm"
FEDHEAD_IMAGE = "localhost/fedhead:test"
PROMETHEUS_IMAGE = "localhost/fedhead-prometheus:test"
# the base image's root file system, kept between runs (build/ is not versioned)
BASE_TARBALL = REPO / "build" / "containers" / "debian-bookworm-python.tar"
# explicit limits: raising the defaults needs CAP_SYS_RESOURCE, which a CI container lacks
RUN_ARGS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# the image's VOLUMEs that a service does not mount (the one-shot services mount few)
# become scratch space instead of anonymous volumes that outlive `down`
COMPOSE_RUN_ARGS = [*RUN_ARGS, "--image-volume", "tmpfs"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# podman-compose from the dev extra (Debian's 1.0.3 ignores network_mode: host)
PODMAN_COMPOSE = Path(sys.executable).parent / "podman-compose"


def missing_tools() -> list[str]:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    return missing + ([] if PODMAN_COMPOSE.is_file() else ["podman-compose"])


def podman(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base_image() -> None:
    """A Debian bookworm image with python3, from Debian's archive (no image registry)."""
    if image_exists(BASE_IMAGE):
        return
    if not BASE_TARBALL.is_file():
        BASE_TARBALL.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=BASE_TARBALL.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates",
                    "bookworm",
                    str(rootfs),
                    "http://deb.debian.org/debian",
                ],
                check=True,
                capture_output=True,
                timeout=900,
            )
            part = BASE_TARBALL.with_suffix(".part")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(part), "."], check=True)
            part.replace(BASE_TARBALL)
    podman("import", str(BASE_TARBALL), BASE_IMAGE)


def build(image: str, containerfile: Path, context: Path, *build_args: str) -> None:
    """``podman build`` in the docker format (it keeps HEALTHCHECK); layers are cached."""
    args = [
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        *RUN_ARGS,
        "--build-arg",
        f"BASE={BASE_IMAGE}",
    ]
    if HOST_CA.is_file():  # pip in the build trusts what the host trusts
        args += ["-v", f"{HOST_CA}:/etc/ssl/certs/host-ca.crt:ro"]
        args += ["--build-arg", "PIP_CERT=/etc/ssl/certs/host-ca.crt"]
    for build_arg in build_args:
        args += ["--build-arg", build_arg]
    podman(*args, "-t", image, "-f", str(containerfile), str(context), timeout=3600)


@dataclass
class ComposeProject:
    """A podman-compose project in ``folder``; every container and volume it made is
    removed by :meth:`remove`."""

    folder: Path
    name: str
    compose_file: str = "compose.yaml"

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [str(PODMAN_COMPOSE), "--in-pod", "false", "-p", self.name, "-f", self.compose_file]
        cmd += ["--podman-run-args", " ".join(COMPOSE_RUN_ARGS), *args]
        result = subprocess.run(
            cmd, cwd=self.folder, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def up(self, services: Sequence[str]) -> None:
        self.compose("up", "-d", *services)

    def down(self) -> None:
        self.compose("down", "-t", "15")

    def container(self, service: str) -> str:
        return f"{self.name}_{service}_1"

    def _listed(self, *cmd: str) -> list[str]:
        label = f"label=io.podman.compose.project={self.name}"
        return podman(*cmd, "--filter", label, check=False).stdout.split()

    def logs(self, service: str) -> str:
        result = podman("logs", self.container(service), check=False)
        return result.stdout + result.stderr

    def exec(self, service: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.container(service), *cmd, check=False)

    def state(self, service: str) -> dict[str, object]:
        out = podman("inspect", self.container(service), "--format", "{{json .State}}").stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def remove(self) -> None:
        """Every container (with its anonymous volumes) and named volume of the project.

        `podman-compose down -v` first; then whatever is left, found by the project's
        label, by id and name (a container that others require goes with them).
        """
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.compose("down", "-v", "-t", "10")
        for cid in self._listed("ps", "-a", "--format", "{{.ID}}"):
            podman("rm", "-f", "-v", "--depend", "-t", "10", cid, check=False)
        for volume in self._listed("volume", "ls", "--format", "{{.Name}}"):
            podman("volume", "rm", "-f", volume, check=False)


@contextlib.contextmanager
def compose_project(folder: Path, name: str) -> Iterator[ComposeProject]:
    project = ComposeProject(folder, name)
    try:
        yield project
    finally:
        project.remove()
