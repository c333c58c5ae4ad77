"""deploy/: no container engine runs here, so the files are linted and schema-checked instead."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATIONS = ["overlays/single", "overlays/ha", "migrate"]
IN_CI = os.environ.get("CI") == "true"
CRD_KINDS = {"ServiceMonitor"}  # not in Kubernetes' own schemas: checked by their fields below


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert list(yaml.safe_load_all(path.read_text()))


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if IN_CI:
            pytest.fail("kubectl is not installed (.ci/run installs it)")
        pytest.skip("kubectl is not installed (kubectl kustomize renders deploy/kubernetes)")
    return kubectl


@functools.cache
def _rendered(kustomization: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(KUBERNETES / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomizations_render_to_manifests_that_match_the_schemas(kustomization: str) -> None:
    documents = _rendered(kustomization)
    assert documents
    for document in documents:
        if document["kind"] not in CRD_KINDS:
            _validate(document)


def test_the_secret_example_matches_the_schema_and_has_every_key_the_manifests_read() -> None:
    (secret,) = yaml.safe_load_all((KUBERNETES / "secret.example.yaml").read_text())
    _validate(secret)
    read = set()
    for kustomization in KUSTOMIZATIONS:
        text = yaml.safe_dump(_rendered(kustomization))
        read |= set(re.findall(r"key: ([a-z-]+)", text))
    assert read and read <= set(secret["stringData"]), read


def _kinds(kustomization: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for document in _rendered(kustomization):
        found.setdefault(document["kind"], []).append(document)
    return found


def test_every_kubernetes_manifest_is_in_a_kustomization() -> None:
    rendered = {(d["kind"], d["metadata"]["name"]) for k in KUSTOMIZATIONS for d in _rendered(k)}
    files = [
        p for p in KUBERNETES.rglob("*.yaml") if p.name not in ("kustomization.yaml", "secret.example.yaml")
    ]
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            name = document["metadata"]["name"]
            assert any(kind == document["kind"] and n.startswith(name) for kind, n in rendered), path


@pytest.mark.parametrize("overlay", ["overlays/single", "overlays/ha"])
def test_overlays_have_a_disruption_budget_a_service_monitor_and_one_image_tag(overlay: str) -> None:
    kinds = _kinds(overlay)
    (deployment,) = [d for d in kinds["Deployment"] if d["metadata"]["name"] == "cluster-engine"]
    (budget,) = [b for b in kinds["PodDisruptionBudget"] if b["metadata"]["name"] == "cluster-engine"]
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    (monitor,) = kinds["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (service,) = [s for s in kinds["Service"] if s["metadata"]["name"] == "cluster-engine"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    assert "http" in ports
    (job,) = _kinds("migrate")["Job"]
    release = job["metadata"]["labels"]["app.kubernetes.io/version"]
    assert job["metadata"]["name"] == f"cluster-engine-migrate-{release}"
    images = {c["image"] for c in [*_containers(deployment), *_containers(job)]}
    assert images == {f"cluster-engine:{release}"}
    assert deployment["metadata"]["labels"]["app.kubernetes.io/version"] == release


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def test_the_ha_overlay_puts_pgbouncer_in_front() -> None:
    kinds = _kinds("overlays/ha")
    names = {d["metadata"]["name"] for d in kinds["Deployment"]}
    assert names == {"cluster-engine", "cluster-engine-pgbouncer"}
    (config,) = kinds["ConfigMap"]
    assert "pool_mode = transaction" in config["data"]["pgbouncer.ini"]


def test_the_readme_documents_the_migrate_then_rollout_sequence() -> None:
    text = (KUBERNETES / "README.md").read_text()
    order = ["kubectl apply -k deploy/kubernetes/migrate", "kubectl wait --for=condition=complete"]
    order += ["kubectl apply -k deploy/kubernetes/overlays/", "kubectl rollout status"]
    positions = [text.index(step) for step in order]
    assert positions == sorted(positions)


def test_deployment_probes_point_at_the_service_probes() -> None:
    deployment = yaml.safe_load((KUBERNETES / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"] and container["resources"]["requests"]


def test_compose_requires_the_secret_and_builds_the_image() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    api = compose["services"]["api"]
    assert api["build"]["dockerfile"] == "deploy/Dockerfile"
    secret = api["environment"]["CE_JWT_SECRET"]
    assert secret.startswith("${CE_JWT_SECRET:?"), secret


def test_dockerfile_declares_its_data_volume() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'VOLUME ["/var/lib/cluster-engine"]' in text
    assert "CE_DATA_DIR=/var/lib/cluster-engine" in text


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "USER 10001" in text and "HEALTHCHECK" in text
