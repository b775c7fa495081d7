"""Real images and containers with podman: a Debian base image made with debootstrap, the
fedhead image and a Prometheus image built on it, and compose projects removed afterwards.

Podman runs rootful with the runc runtime, host networking, explicit ulimits and
``localhost/`` image names: what works on machines without a Docker daemon or a registry.
Every image and project is named for this test session (the host is shared) and removed
at its end, also when it fails or is stopped with Ctrl-C or SIGTERM (the test session
turns SIGTERM into KeyboardInterrupt); a podman command interrupted midway is stopped
with everything it started, and a second Ctrl-C does not cut the clean-up short.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

SESSION = uuid.uuid4().hex[:8]  # this test session's images, apart from anyone else's
BASE_IMAGE = f"localhost/fedhead-test-base:{SESSION}"
FEDHEAD_IMAGE = f"localhost/fedhead:test-{SESSION}"
PROMETHEUS_IMAGE = f"localhost/fedhead-prometheus:test-{SESSION}"
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


def run(
    cmd: Sequence[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``cmd`` in a session of its own; interrupted (Ctrl-C, SIGTERM, timeout), it is
    stopped with every process it started (podman-compose's podman calls) before the
    interruption goes on, so the clean-up that follows finds everything it made."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with uninterrupted():
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=wait)
                    break
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Clean-up that a second Ctrl-C (or SIGTERM) does not cut short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def podman(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = run(["podman", "--runtime", "runc", *args], timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base_image() -> None:
    """A Debian bookworm image with python3, from Debian's archive (no image registry);
    its root file system is kept in build/ between sessions, the image is not."""
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
    """``podman build`` in the docker format (it keeps HEALTHCHECK), keeping no
    intermediate layer images: removing ``image`` frees everything the build stored."""
    args = [
        "build",
        "--format",
        "docker",
        "--layers=false",
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
        result = run(cmd, timeout, cwd=self.folder)
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
        state: dict[str, object] = json.loads(out)
        return state

    def remove(self) -> None:
        """Every container (with its anonymous volumes) and named volume of the project.

        `podman-compose down -v` first; then whatever is left, found by the project's
        label, by id and name (a container that others require goes with them).
        """
        with uninterrupted():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.compose("down", "-v", "-t", "10")
            for cid in self._listed("ps", "-a", "--format", "{{.ID}}"):
                podman("rm", "-f", "-v", "--depend", "-t", "10", cid, check=False)
            for volume in self._listed("volume", "ls", "--format", "{{.Name}}"):
                podman("volume", "rm", "-f", volume, check=False)

    def leftovers(self) -> list[str]:
        """The project's containers and volumes that still exist (none after remove)."""
        return self._listed("ps", "-a", "--format", "{{.ID}}") + self._listed(
            "volume", "ls", "--format", "{{.Name}}"
        )


@contextlib.contextmanager
def compose_project(folder: Path, name: str) -> Iterator[ComposeProject]:
    project = ComposeProject(folder, name)
    try:
        yield project
    finally:
        project.remove()


def remove_images(*names: str) -> None:
    """This session's images (none of anyone else's), also after a Ctrl-C."""
    with uninterrupted():
        present = [name for name in names if image_exists(name)]
        if present:
            podman("rmi", "-f", *present, check=False, timeout=300)
