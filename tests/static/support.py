"""Readers for the deployment files, and the expectations derived from the project's tables.

Every expectation comes from `billstream_runtime.routes` (SERVICES, ROUTES) and
`billstream_contracts.topics` (TOPICS), so adding a service, a route or a topic there makes
these tests fail until docker-compose.yml, the Dockerfiles, nginx.conf and deploy/k8s follow.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
NGINX_CONF = REPO / "deploy" / "compose" / "nginx.conf"
POSTGRES_INIT = REPO / "deploy" / "compose" / "postgres-init.sql"
GATEWAY_DOCKERFILE = REPO / "deploy" / "gateway.Dockerfile"
K8S_DIR = REPO / "deploy" / "k8s"

CONTAINER_PORT = 8000
PYTHON_BASE_IMAGE = "python:3.11-slim"
GATEWAY_MODULE = "billstream_localstack.gateway"


def dns_name(service: str) -> str:
    """The name of a service in compose and Kubernetes (DNS labels allow no underscore)."""
    return service.replace("_", "-")


def module(service: str) -> str:
    return f"billstream_{service}"


def distribution(service: str) -> str:
    return f"billstream-{dns_name(service)}"


def service_env(service: str) -> tuple[str, str, str]:
    prefix = f"BILLSTREAM_{service.upper()}_"
    return prefix + "DATABASE_URL", prefix + "HTTP_HOST", prefix + "HTTP_PORT"


SHARED_ENV = ("BILLSTREAM_KAFKA_BOOTSTRAP", "BILLSTREAM_ADMIN_TOKEN", "BILLSTREAM_LOG_LEVEL")


def dockerfile_path(service: str) -> Path:
    return REPO / "services" / service / "Dockerfile"


# --- Dockerfiles -------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order, with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def resolved_from_images(instructions: list[Instruction]) -> list[str]:
    """The image of every FROM, with ARG defaults declared before the first FROM applied."""
    args: dict[str, str] = {}
    images = []
    for ins in instructions:
        if ins.keyword == "ARG" and not images:
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip()
        elif ins.keyword == "FROM":
            image = ins.args.split()[0]
            for name, value in args.items():
                image = image.replace("${" + name + "}", value).replace("$" + name, value)
            images.append(image)
    return images


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD / HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def uv_sync_commands(instructions: list[Instruction]) -> list[list[str]]:
    return [
        shlex.split(ins.args)
        for ins in instructions
        if ins.keyword == "RUN" and "uv sync" in ins.args
    ]


def flag_value(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


# --- docker-compose.yml ------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_map(environment: Any) -> dict[str, str]:
    """A compose `environment` as a dict (it may be a mapping or a list of NAME=value)."""
    if environment is None:
        return {}
    if isinstance(environment, dict):
        return {k: "" if v is None else str(v) for k, v in environment.items()}
    out = {}
    for item in environment:
        name, _, value = str(item).partition("=")
        out[name] = value
    return out


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as name -> condition (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host side, container port) of every published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((str(port.get("published", "")), str(port["target"])))
            continue
        parts = str(port).split(":")
        container = parts[-1].split("/")[0]
        host = ":".join(parts[:-1])
        out.append((host, container))
    return out


def compose_service_for_dockerfile(compose: dict[str, Any], dockerfile: str) -> str | None:
    for name, spec in compose["services"].items():
        build = spec.get("build")
        if isinstance(build, dict) and build.get("dockerfile") == dockerfile:
            return name
    return None


def topic_specs(value: str) -> list[tuple[str, int, int | None]]:
    """'name:partitions:retention_ms|default ...' as a list, in order."""
    out = []
    for spec in value.split():
        name, partitions, retention = spec.split(":")
        out.append((name, int(partitions), None if retention == "default" else int(retention)))
    return out


def expected_topic_specs() -> list[tuple[str, int, int | None]]:
    from billstream_contracts.topics import TOPICS

    return [(t.name, t.partitions, t.retention_ms) for t in TOPICS]


# --- nginx.conf --------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]


def _nginx_tokens(text: str):
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            yield c
            i += 1
        elif c in "\"'":
            quote, i, buf = c, i + 1, []
            while i < n and text[i] != quote:
                if text[i] == "\\" and i + 1 < n and text[i + 1] in (quote, "\\"):
                    i += 1
                buf.append(text[i])
                i += 1
            if i >= n:
                raise ValueError("unterminated quoted string in nginx.conf")
            i += 1
            yield ("word", "".join(buf))
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in "{};":
                i += 1
            yield ("word", text[start:i])


def parse_nginx(text: str) -> list[Directive]:
    """nginx configuration as a tree of directives (enough of the grammar for our file)."""
    root: list[Directive] = []
    stack = [root]
    words: list[str] = []
    for tok in _nginx_tokens(text):
        if isinstance(tok, tuple):
            words.append(tok[1])
        elif tok == ";":
            assert words, "empty directive"
            stack[-1].append(Directive(words[0], words[1:]))
            words = []
        elif tok == "{":
            assert words, "block without a name"
            directive = Directive(words[0], words[1:], block=[])
            stack[-1].append(directive)
            stack.append(directive.block)
            words = []
        else:  # "}"
            assert not words and len(stack) > 1, "unbalanced braces in nginx.conf"
            stack.pop()
    assert len(stack) == 1 and not words, "unbalanced braces in nginx.conf"
    return root


def nginx_server() -> Directive:
    (http,) = [d for d in parse_nginx(NGINX_CONF.read_text()) if d.name == "http"]
    servers = http.find("server")
    assert len(servers) == 1, "nginx.conf should have exactly one server block"
    return servers[0]


def nginx_upstream_host(location: Directive) -> str:
    """The host a location proxies to (proxy_pass URL, possibly through one `set` variable)."""
    (proxy_pass,) = location.find("proxy_pass")
    target = proxy_pass.args[0]
    if target.startswith("$"):
        sets = {d.args[0]: d.args[1] for d in location.find("set")}
        target = sets[target]
    match = re.fullmatch(r"http://([^:/]+):(\d+)", target)
    assert match, f"proxy_pass target {target!r} should be http://<host>:<port> with no path"
    assert int(match.group(2)) == CONTAINER_PORT, target
    return match.group(1)


# --- Kubernetes --------------------------------------------------------------------------


def load_k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc.setdefault("__file__", path)
                docs.append(doc)
    return docs


def k8s_objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if doc.get("kind") == kind:
            name = doc["metadata"]["name"]
            assert name not in out, f"two {kind}s named {name}"
            out[name] = doc
    return out


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env") or []}


# --- routing -----------------------------------------------------------------------------


def sample_paths(pattern: str) -> list[str]:
    """Paths a route is meant to match, and near misses, built from its pattern."""
    base = pattern.removeprefix("^").replace("[^/]+", "cus_123")
    assert base.endswith("(/|$)"), f"route pattern {pattern!r} should end with (/|$)"
    base = base.removesuffix("(/|$)")
    assert re.fullmatch(r"[/\w]+", base), f"unexpected syntax in route pattern {pattern!r}"
    return [base, base + "/", base + "/obj_1", base + "/obj_1/action", base + "x", base[:-1]]
