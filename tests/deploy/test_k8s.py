"""The Kubernetes manifests in deploy/k8s: valid against the Kubernetes API schemas
(kubernetes-validate, offline, strict: no unknown fields), and consistent with the image
and with each other."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "gpu-patch.yaml")
# the oldest Kubernetes release still supported upstream when this was written, and the newest
KUBERNETES_VERSIONS = ["1.32.0", "1.37.0"]


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _documents(p) if d["kind"] == kind]


def _pod(kind: str) -> dict[str, Any]:
    (workload,) = _by_kind(kind)
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_match_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = _documents(path)
    assert docs
    for doc in docs:
        _validate(doc, version)


def test_a_wrong_field_is_caught() -> None:
    """The validation is real: a typo in a manifest fails it."""
    (statefulset,) = _by_kind("StatefulSet")
    broken = copy.deepcopy(statefulset)
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken, KUBERNETES_VERSIONS[-1])


def test_gpu_patch_gives_a_valid_deployment() -> None:
    """gpu-patch.yaml merged as `kubectl patch` merges it (containers by name)."""
    (deployment,) = _by_kind("Deployment")
    patch = yaml.safe_load((K8S / "site" / "gpu-patch.yaml").read_text())
    patched = copy.deepcopy(deployment)
    (node_patch,) = patch["spec"]["template"]["spec"]["containers"]
    (node,) = patched["spec"]["template"]["spec"]["containers"]
    assert node["name"] == node_patch["name"]
    node["image"] = node_patch["image"]
    node["resources"].setdefault("limits", {}).update(node_patch["resources"]["limits"])
    _validate(patched, KUBERNETES_VERSIONS[-1])
    assert node["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_pods_run_the_image_as_its_user_with_read_only_secrets(kind: str) -> None:
    pod = _pod(kind)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["args"][0] in ("superlink", "node")  # the image's entrypoint is fedhead
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {
        t["metadata"]["name"] for t in _by_kind(kind)[0]["spec"].get("volumeClaimTemplates", [])
    }
    assert set(mounts) == set(volumes) | claims  # every mount has a volume and back
    assert mounts["certs"]["readOnly"] is True and "secret" in volumes["certs"]
    # the mount points are the image's volumes
    assert {m["mountPath"] for m in mounts.values()} >= {"/var/lib/fedhead", "/etc/fedhead/certs"}


def test_superlink_keeps_state_and_is_scraped() -> None:
    (statefulset,) = _by_kind("StatefulSet")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--database=/var/lib/fedhead/superlink.db" in args
    assert "--certs-dir=/etc/fedhead/certs" in args
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert f"--metrics-address=0.0.0.0:{annotations['prometheus.io/port']}" in args


def test_site_reads_its_data_read_only_and_caches_on_a_claim() -> None:
    pod = _pod("Deployment")
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["data"]["readOnly"] is True
    assert volumes["data"]["persistentVolumeClaim"]["readOnly"] is True
    claims = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] in claims
    assert mounts["cache"]["mountPath"] == "/var/cache/fedhead"
    assert "--cache-dir=/var/cache/fedhead" in container["args"]


def test_only_the_fleet_api_leaves_the_superlink_pod() -> None:
    """The SuperLink's own port serves the Control API: loopback in the pod, no Service;
    the sites' Service reaches nginx's public port, and the signed app is mounted."""
    pod = _pod("StatefulSet")
    (container,) = pod["containers"]
    args = container["args"]
    assert "--host=127.0.0.1" in args and "--port=8000" in args
    assert "--public-address=0.0.0.0:9443" in args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"fleet": 9443, "metrics": 9400}
    exposed = {
        (port["port"], ports[port["targetPort"]])
        for service in _by_kind("Service")
        if service["spec"]["selector"]["app.kubernetes.io/component"] == "superlink"
        for port in service["spec"]["ports"]
    }
    assert exposed == {(9443, 9443), (9400, 9400)}  # never 8000
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert f"--signed-app={mounts['signed-app']}" in args
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "secret" in volumes["signed-app"]


def test_site_runs_only_signed_apps_and_reaches_the_public_port() -> None:
    pod = _pod("Deployment")
    (container,) = pod["containers"]
    args = container["args"]
    assert "--trusted-entities=/etc/fedhead/certs/trusted-entities.yaml" in args
    assert "--allow-unsigned-apps" not in args
    (superlink,) = (a for a in args if a.startswith("--superlink="))
    assert superlink.endswith(":9443")
    (policy,) = _by_kind("NetworkPolicy")
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {9443, 53}
