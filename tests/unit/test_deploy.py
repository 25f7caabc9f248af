"""The files under deploy/, validated offline: every Kubernetes manifest of the kustomize base
against the schemas bundled with kubernetes-validate (strict: unknown fields are errors), the
KEDA ScaledObject against KEDA's own CRD schema (vendored in tests/schemas: Kubernetes' bundled
schemas hold no custom resources), compose.yaml against the compose-spec schema (vendored),
the Grafana dashboard's queries against the metrics Conveyor declares. Nothing here needs a
registry, a cluster or docker."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from conveyor import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
SCHEMAS = ROOT / "tests" / "schemas"
KUBERNETES_VERSION = "1.31.0"  # the oldest minor still supported upstream when written
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "labels", "images", "namespace",
                        "commonAnnotations", "secretGenerator", "configMapGenerator",
                        "patches", "replicas", "namePrefix", "nameSuffix", "components"}

Resource = dict[str, Any]


def kustomization() -> Resource:
    loaded: Resource = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return loaded


@cache
def resources() -> tuple[tuple[str, Resource], ...]:
    """(file, resource) for every document of every file the kustomization lists."""
    out = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc is not None:
                out.append((name, doc))
    return tuple(out)


def of_kind(kind: str) -> list[Resource]:
    return [r for _, r in resources() if r["kind"] == kind]


def named(kind: str, name: str) -> Resource:
    found = [r for r in of_kind(kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_the_kustomization_lists_every_manifest_and_only_files_that_exist() -> None:
    spec = kustomization()
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert spec["kind"] == "Kustomization"
    assert set(spec) <= KUSTOMIZATION_FIELDS, set(spec) - KUSTOMIZATION_FIELDS
    listed = spec["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (BASE / name).is_file(), f"{name} is listed but missing"
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed), f"not listed: {on_disk - set(listed)}"
    images = {c["image"] for d in of_kind("Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {i["name"] for i in spec["images"]}  # the overlay's `images:` applies


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists fields and does not keep
    unknown ones (what kubernetes-validate's strict schemas do for built-in kinds)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@cache
def scaled_object_schema() -> Any:
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # checked by the shared test below
    return schema


@pytest.mark.parametrize(("source", "resource"), resources(),
                         ids=[f"{f}:{r['kind']}/{r['metadata']['name']}" for f, r in resources()])
def test_every_manifest_is_valid(source: str, resource: Resource) -> None:
    assert set(resource["metadata"]) <= {"name", "labels", "annotations"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", resource["metadata"]["name"])
    if resource["apiVersion"] == "keda.sh/v1alpha1":
        assert resource["kind"] == "ScaledObject"
        jsonschema.Draft7Validator(scaled_object_schema()).validate(resource)
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def env_of(deployment: Resource) -> dict[str, str]:
    """The container's settings: its ConfigMap's data, then its own `env`."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(named("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            named("Secret", source["secretRef"]["name"])  # it exists
    values.update({e["name"]: e["value"] for e in container.get("env", [])})
    return values


def probe(container: Resource, kind: str) -> tuple[str, int]:
    get = container[kind]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == get["port"])
    return get["path"], port


def test_probes_grace_periods_and_requests_fit_what_each_process_serves() -> None:
    paths = {}
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        env = env_of(deployment)
        assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["CONVEYOR_DRAIN_TIMEOUT"])
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"][
            "labels"].items()
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        paths[component] = (probe(container, "readinessProbe"), probe(container, "livenessProbe"))
        port = int(env.get("CONVEYOR_METRICS_PORT", env.get("CONVEYOR_PORT", "8080")))
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert paths == {
        "api": (("/readyz", 8080), ("/healthz", 8080)),
        "worker": (("/healthz", 9090), ("/healthz", 9090)),
        "cron": (("/healthz", 9090), ("/healthz", 9090)),
    }
    assert named("Deployment", "conveyor-cron")["spec"]["replicas"] == 2
    worker = named("Deployment", "conveyor-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["worker", "--processes"]


def pods_matching(selector: dict[str, str]) -> list[str]:
    return [d["metadata"]["name"] for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]


def test_services_budgets_and_the_scaler_point_at_the_deployments() -> None:
    for service in of_kind("Service"):
        assert pods_matching(service["spec"]["selector"]) == ["conveyor-api"]
    budgets = {pods_matching(b["spec"]["selector"]["matchLabels"])[0] for b in
               of_kind("PodDisruptionBudget")}
    assert budgets == {d["metadata"]["name"] for d in of_kind("Deployment")}
    (scaler,) = of_kind("ScaledObject")
    target = scaler["spec"]["scaleTargetRef"]
    assert named("Deployment", target["name"])["kind"] == target["kind"]
    queries = [t["metadata"]["query"] for t in scaler["spec"]["triggers"]]
    assert {name for q in queries for name in metric_names(q)} == {
        "conveyor_queue_lag", "conveyor_queue_oldest_age_seconds"}


def declared() -> set[str]:
    """Names of every metric Conveyor declares (counters without their `_total`)."""
    return {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads, without exposition suffixes."""
    return {re.sub(r"_(bucket|sum|count|total)$", "", n)
            for n in re.findall(r"\bconveyor_[a-z_]+", expr)}


def test_the_dashboard_reads_only_metrics_that_exist_and_shows_each_of_them() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "conveyor.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {name for e in exprs for name in metric_names(e)}
    assert used <= declared(), used - declared()
    assert used == declared()  # every metric has a panel
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert any(v["name"] == "datasource" for v in dashboard["templating"]["list"])


def test_the_compose_file_is_valid_and_starts_services_after_their_servers() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "api", "worker", "cron"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    for name in ("api", "worker", "cron"):
        service = services[name]
        assert service["command"][0] == name
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                         "redis": {"condition": "service_healthy"}}
        assert "healthcheck" in service
        assert {"DATABASE_URL", "REDIS_URL"} <= service["environment"].keys()
        drain = float(service["environment"]["CONVEYOR_DRAIN_TIMEOUT"])
        assert float(service["stop_grace_period"].removesuffix("s")) > drain
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name]
    # The API listens on 0.0.0.0 in its container, where it refuses to start without a key:
    # compose must stop at once naming the variable, not restart the API forever.
    keys = services["api"]["environment"]["CONVEYOR_API_KEYS"]
    assert re.fullmatch(r"\$\{CONVEYOR_API_KEYS:\?[^}]+\}", keys), keys


def test_the_image_runs_as_a_user_without_the_embedded_servers() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert all(line.startswith("FROM python:") and line.split()[1].endswith("-slim")
               for line in lines if line.startswith("FROM"))
    assert "embedded" not in " ".join(lines)
    user = [line for line in lines if line.startswith("USER")]
    assert user
    assert user[-1].split()[1].split(":")[0] not in {"0", "root"}
    assert 'ENTRYPOINT ["conveyor"]' in lines


def test_the_placeholder_secret_holds_no_api_key_that_would_be_accepted() -> None:
    # Applied as it is, a placeholder key (`CHANGE-ME`) would be a working admin key that
    # everyone can read here; empty, the API refuses to start until a real key is set.
    secret = named("Secret", "conveyor")
    assert secret["stringData"]["CONVEYOR_API_KEYS"] == ""
