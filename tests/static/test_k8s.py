"""deploy/k8s: per service a Deployment, a Service and a migration Job; an Ingress that routes
like ROUTES; everything reachable from the root kustomization."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from billstream_runtime.routes import ROUTES, SERVICES, service_for

from .support import (
    expected_topic_specs,
    CONTAINER_PORT,
    GATEWAY_MODULE,
    K8S_DIR,
    SHARED_ENV,
    container_env,
    dns_name,
    k8s_objects,
    load_k8s,
    module,
    pod_spec,
    sample_paths,
    service_env,
    topic_specs,
)

CONFIG_MAP = "billstream-config"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return load_k8s()


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return k8s_objects(docs, kind)


def _only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(workload)["containers"]
    return container


def _secret_keys(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    return {
        name: set((s.get("stringData") or {}) | (s.get("data") or {}))
        for name, s in _kind(docs, "Secret").items()
    }


def _env_sources(docs: list[dict[str, Any]], container: dict[str, Any]) -> set[str]:
    """Every variable name the container gets: env, plus envFrom ConfigMaps and Secrets."""
    names = set(container_env(container))
    config_maps = _kind(docs, "ConfigMap")
    secrets = _secret_keys(docs)
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            names |= set(config_maps[source["configMapRef"]["name"]]["data"])
        if "secretRef" in source:
            names |= secrets[source["secretRef"]["name"]]
    return names


def _check_database_url(
    docs: list[dict[str, Any]], container: dict[str, Any], service: str
) -> None:
    db_var = service_env(service)[0]
    ref = container_env(container)[db_var]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _secret_keys(docs)[ref["name"]]
    # Its own database URL only: never a whole Secret holding every service's.
    for source in container.get("envFrom") or []:
        if "secretRef" in source:
            keys = _secret_keys(docs)[source["secretRef"]["name"]]
            assert not {service_env(s)[0] for s in SERVICES} & keys


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("service", SERVICES)
def test_deployment(docs: list[dict[str, Any]], service: str) -> None:
    name = dns_name(service)
    deployment = _kind(docs, "Deployment")[name]
    spec = deployment["spec"]
    assert _matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    container = _only_container(deployment)
    image = container["image"]
    assert image.split(":")[0].endswith(f"/{name}")
    assert (container.get("command") or []) + container.get("args", []) in (
        [],
        ["python", "-m", module(service)],
    )
    assert [p["containerPort"] for p in container["ports"]] == [CONTAINER_PORT]

    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in (CONTAINER_PORT, "http")

    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]

    env = container_env(container)
    _, host_var, port_var = service_env(service)
    assert env[host_var]["value"] == "0.0.0.0"
    assert env[port_var]["value"] == str(CONTAINER_PORT)
    assert {"configMapRef", "secretRef"} <= {k for s in container["envFrom"] for k in s}
    assert {*SHARED_ENV, *service_env(service)} <= _env_sources(docs, container)
    _check_database_url(docs, container, service)
    assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("service", SERVICES)
def test_service(docs: list[dict[str, Any]], service: str) -> None:
    name = dns_name(service)
    svc = _kind(docs, "Service")[name]
    deployment = _kind(docs, "Deployment")[name]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(svc["spec"]["selector"], pod_labels)
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "http" and port["port"] == CONTAINER_PORT
    assert port["targetPort"] in ("http", CONTAINER_PORT)
    # No other pod (e.g. the migration Job's) is selected by the Service.
    for kind in ("Deployment", "Job"):
        for other_name, other in _kind(docs, kind).items():
            if (kind, other_name) != ("Deployment", name):
                labels = other["spec"]["template"]["metadata"].get("labels", {})
                assert not _matches(svc["spec"]["selector"], labels), other_name


@pytest.mark.parametrize("service", SERVICES)
def test_migration_job(docs: list[dict[str, Any]], service: str) -> None:
    job = _kind(docs, "Job")[f"{dns_name(service)}-migrate"]
    container = _only_container(job)
    command = (container.get("command") or []) + container.get("args", [])
    assert command == ["python", "-m", module(service), "migrate"]
    deployment = _kind(docs, "Deployment")[dns_name(service)]
    assert container["image"] == _only_container(deployment)["image"]
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    _check_database_url(docs, container, service)


def test_shared_settings(docs: list[dict[str, Any]]) -> None:
    data = _kind(docs, "ConfigMap")[CONFIG_MAP]["data"]
    assert re.fullmatch(r"[^\s:,]+:\d+(,[^\s:,]+:\d+)*", data["BILLSTREAM_KAFKA_BOOTSTRAP"])
    assert data["BILLSTREAM_LOG_LEVEL"]


def test_gateway(docs: list[dict[str, Any]]) -> None:
    deployment = _kind(docs, "Deployment")["gateway"]
    container = _only_container(deployment)
    assert container["args"] == ["python", "-m", GATEWAY_MODULE]
    env = container_env(container)
    assert env["BILLSTREAM_GATEWAY_PORT"]["value"] == str(CONTAINER_PORT)
    assert env["BILLSTREAM_GATEWAY_HOST"]["value"] == "0.0.0.0"
    upstreams = json.loads(env["BILLSTREAM_GATEWAY_UPSTREAMS"]["value"])
    services = _kind(docs, "Service")
    assert list(upstreams) == list(SERVICES)
    for service, url in upstreams.items():
        assert url == f"http://{dns_name(service)}:{CONTAINER_PORT}"
        assert dns_name(service) in services
    assert _matches(
        services["gateway"]["spec"]["selector"],
        deployment["spec"]["template"]["metadata"]["labels"],
    )


@pytest.fixture(scope="module")
def ingress_paths(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    (ingress,) = _kind(docs, "Ingress").values()
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/use-regex"] == "true"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    out = []
    services = _kind(docs, "Service")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "ImplementationSpecific"
            # The Ingress API rejects a path that does not start with "/".
            assert path["path"].startswith("/")
            backend = path["backend"]["service"]
            port = backend["port"]
            target = services[backend["name"]]["spec"]["ports"][0]
            assert port.get("name") == target["name"] or port.get("number") == target["port"]
            out.append((path["path"], backend["name"]))
    return out


def test_ingress_paths_are_the_routes_in_order(ingress_paths: list[tuple[str, str]]) -> None:
    route_paths = ingress_paths[: len(ROUTES)]
    # ingress-nginx writes each path as `~* "^<path>"`.
    assert ["^" + path for path, _ in route_paths] == [route.pattern for route in ROUTES]
    assert [name for _, name in route_paths] == [dns_name(route.service) for route in ROUTES]
    extra = dict(ingress_paths[len(ROUTES) :])
    assert extra == {r"/openapi\.json$": "gateway", "/docs$": "gateway"}


def _ingress_nginx_pick(ingress_paths: list[tuple[str, str]], path: str) -> str | None:
    """ingress-nginx: regex locations sorted by descending path length, case-insensitive."""
    ordered = sorted(ingress_paths, key=lambda item: len(item[0]), reverse=True)
    for pattern, backend in ordered:
        if re.match("^" + pattern, path, re.IGNORECASE):
            return backend
    return None


@pytest.mark.parametrize("route", ROUTES, ids=[r.pattern for r in ROUTES])
def test_ingress_nginx_order_picks_the_same_service(
    ingress_paths: list[tuple[str, str]], route
) -> None:
    for path in sample_paths(route.pattern):
        expected = service_for(path)
        assert _ingress_nginx_pick(ingress_paths, path) == (expected and dns_name(expected)), path
    assert _ingress_nginx_pick(ingress_paths, "/openapi.json") == "gateway"
    assert _ingress_nginx_pick(ingress_paths, "/docs") == "gateway"


def test_topics_job_creates_every_topic(docs: list[dict[str, Any]]) -> None:
    container = _only_container(_kind(docs, "Job")["kafka-topics"])
    assert container["image"].startswith("apache/kafka:")
    env = container_env(container)
    assert topic_specs(env["BILLSTREAM_TOPICS"]["value"]) == expected_topic_specs()
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "kafka-topics.sh" in script and "--if-not-exists" in script
    assert "BILLSTREAM_KAFKA_BOOTSTRAP" in _env_sources(docs, container)


def _kustomize_files(directory: Path, seen: set[Path]) -> set[Path]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization.get("namespace") == "billstream", directory
    files: set[Path] = set()
    for resource in kustomization.get("resources", []):
        target = (directory / resource).resolve()
        if target.is_dir():
            assert target not in seen, f"{target} included twice"
            seen.add(target)
            files |= _kustomize_files(target, seen)
        else:
            assert target.is_file(), f"{directory}: missing resource {resource}"
            files.add(target)
    return files


def test_root_kustomization_includes_every_manifest() -> None:
    reachable = _kustomize_files(K8S_DIR, set())
    manifests = {p.resolve() for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert reachable == manifests


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_deploys_alone(service: str) -> None:
    directory = K8S_DIR / "services" / service
    files = _kustomize_files(directory, set())
    kinds = set()
    for path in files:
        kinds |= {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert kinds == {"Deployment", "Service", "Job"}
