"""The Kubernetes manifests under deploy/kubernetes, validated as the API server would:
the Deployment, Service and HorizontalPodAutoscaler against the Kubernetes schemas
(``kubernetes-validate``), the RayService against KubeRay's CRD schema (vendored in
tests/data/kuberay), its ``serveConfigV2`` against Ray Serve's own config schema, and the
application it names built from its args. No cluster runs here."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
CRD = Path(__file__).parent / "data" / "kuberay" / "ray.io_rayservices.yaml.gz"
KUBERNETES_VERSION = "1.33"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def test_plain_deployment_service_and_hpa_pass_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra is not installed")
    docs = documents("deployment.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)   # raises on any error


def test_the_schema_check_can_fail():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra is not installed")
    deployment = documents("deployment.yaml")[0]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_hpa_scales_on_the_servers_waiting_requests_metric():
    from server.metrics import ServerMetrics

    deployment, service, hpa = documents("deployment.yaml")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f"# TYPE {metric} gauge" in ServerMetrics().render().decode()   # a metric the server exports
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def _crd_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_rayservice_passes_kuberays_crd_schema():
    import jsonschema

    (service,) = documents("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    schema = _crd_schema()
    jsonschema.validate(service, schema)
    broken = {**service, "spec": {**service["spec"], "rayClusterConfig": {"headGroupSpec": "none"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_rayservice_serve_config_is_a_valid_ray_serve_config_for_our_app():
    pytest.importorskip("ray.serve", reason='the Ray Serve extra is not installed (pip install -e ".[ray]")')
    from ray.serve.schema import ServeDeploySchema

    from server.ray_serve import app_builder
    from server.settings import ServerSettings

    (service,) = documents("rayservice.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "server.ray_serve:app_builder"
    settings = ServerSettings(**app.args)          # the args are server settings, by field name
    assert settings.uses_ray() and settings.autoscale_bounds() == (1, 8)
    application = app_builder(app.args)
    assert type(application).__name__ == "Application"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__


def test_rayservice_image_is_the_ray_build_of_our_image():
    (service,) = documents("rayservice.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert images == {"coconut-serve:cpu-ray"}
    assert "SETUP_FLAGS=--ray" in (MANIFESTS / "rayservice.yaml").read_text()
    assert 'ARG SETUP_FLAGS=""' in (ROOT / "docker" / "Dockerfile").read_text()
