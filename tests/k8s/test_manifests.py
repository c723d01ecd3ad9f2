"""Every manifest users apply, checked against the Kubernetes versions they run (1.28-1.33).

The only API server these machines can build is 1.20 (test_operator.py, test_cluster.py run against it), so the
newer versions are checked by schema: each object that `kubectl kustomize` builds from deploy/ (and its overlays)
and crds/, and every example, strictly against the OpenAPI schemas of each version (kubernetes-validate, which
rejects unknown fields and kinds a version no longer serves); our own custom resources against the schema of the
CRD that defines them. A manifest that uses an API removed after 1.20 fails here, not on a user's cluster.
"""

from __future__ import annotations

import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from k8s_cluster import KUBECTL, ROOT

VERSIONS = ("1.28.0", "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
KUSTOMIZATIONS = ("deploy", "deploy/external-etcd", "crds")
EXAMPLES = ("deploy/examples/mesh.yaml", "deploy/examples/meshpeer.yaml")
# prometheus-operator's kinds: their schemas ship with prometheus-operator, not with Kubernetes or us. They are
# checked for what deploy/monitoring/README.md promises (their API group), and PromQL by test_monitoring_files.py.
PROMETHEUS_OPERATOR = ("deploy/monitoring/podmonitor.yaml", "deploy/monitoring/prometheusrule.yaml")
NAMESPACE = "warren-mesh"


def _kustomize(directory: str) -> list[dict[str, Any]]:
    built = subprocess.run([KUBECTL, "kustomize", str(ROOT / directory)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"kubectl kustomize {directory}: {built.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def _file(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / path).read_text()) if doc]


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of that version of our CRDs."""
    schemas = {}
    for crd in _kustomize("crds"):
        assert crd["kind"] == "CustomResourceDefinition", crd["kind"]
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def _unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields a structural schema does not declare (the API server would prune them: a typo in a user's file)."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                if not (path == "" and key in ("apiVersion", "kind", "metadata")):
                    found.append(f"{path}.{key}")
                continue
            found.extend(_unknown_fields(item, schema["properties"][key], f"{path}.{key}"))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found.extend(_unknown_fields(item, schema["items"], f"{path}[{index}]"))
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_current_kubernetes(version: str) -> None:
    custom = _crd_schemas()
    checked = 0
    objects = [(d, doc) for d in KUSTOMIZATIONS for doc in _kustomize(d)] + [
        (p, doc) for p in EXAMPLES for doc in _file(p)
    ]
    for source, doc in objects:
        where = f"{source}: {doc['kind']}/{doc['metadata'].get('name')}"
        schema = custom.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.validate(doc, schema)
            assert not _unknown_fields(doc, schema), f"{where}: fields the CRD does not have"
        else:
            # Raises SchemaNotFoundError for a kind this version does not serve (an API removed since 1.20).
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                raise AssertionError(f"{where} is not valid for Kubernetes {version}: {exc}") from exc
        checked += 1
    # deploy/ alone has some 20 objects; a build that came out empty must not pass.
    assert checked >= 20, checked


def test_prometheus_operator_objects_use_its_api() -> None:
    for path in PROMETHEUS_OPERATOR:
        for doc in _file(path):
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", path
            assert doc["kind"] in ("PodMonitor", "PrometheusRule"), path


def test_the_namespace_admits_the_privileged_pods_it_runs() -> None:
    """Pod Security Admission (on by default since 1.23, `baseline` in many clusters) would refuse the agent's
    host-network, privileged pods: the namespace says `privileged`, as Calico's and Cilium's do."""
    objects = _kustomize("deploy")
    namespace = next(d for d in objects if d["kind"] == "Namespace" and d["metadata"]["name"] == NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    privileged = [
        d["metadata"]["name"]
        for d in objects
        if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet")
        and (
            d["spec"]["template"]["spec"].get("hostNetwork")
            or any(
                (c.get("securityContext") or {}).get("privileged") for c in d["spec"]["template"]["spec"]["containers"]
            )
        )
    ]
    assert "warren-mesh-agent" in privileged, privileged  # the reason for the label is still there


def test_the_validator_refuses_what_it_should() -> None:
    """The checks above can fail: an API removed after 1.20, an unknown field, a field our CRD lacks."""
    cronjob = {"apiVersion": "batch/v1beta1", "kind": "CronJob", "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(cronjob, "1.28.0", strict=True)
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}, "dta": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(config, "1.28.0", strict=True)
    mesh = _file(EXAMPLES[0])[0]
    mesh["spec"]["overlayCidr"] = "10.0.0.0/8"
    assert _unknown_fields(mesh, _crd_schemas()[(mesh["apiVersion"], mesh["kind"])]) == [".spec.overlayCidr"]
