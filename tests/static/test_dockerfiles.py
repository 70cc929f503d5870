"""Every service has its own image: built from the workspace, only its own package, non-root."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from billstream_runtime.routes import SERVICES

from .support import (
    CONTAINER_PORT,
    GATEWAY_DOCKERFILE,
    GATEWAY_MODULE,
    PYTHON_BASE_IMAGE,
    REPO,
    distribution,
    dockerfile_path,
    exec_form,
    flag_value,
    module,
    parse_dockerfile,
    resolved_from_images,
    service_env,
    uv_sync_commands,
)


def test_every_service_directory_is_in_the_route_table() -> None:
    on_disk = {p.parent.name for p in (REPO / "services").glob("*/pyproject.toml")}
    assert on_disk == set(SERVICES)


def _project_name(directory: Path) -> str:
    return tomllib.loads((directory / "pyproject.toml").read_text())["project"]["name"]


def _module_dir(dotted: str) -> Path | None:
    """Where a top-level package lives in the workspace, if it does."""
    top = dotted.split(".")[0]
    for candidate in [*REPO.glob(f"services/*/{top}"), *REPO.glob(f"libs/*/{top}")]:
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def _check_image(path: Path, package: str, cmd: list[str]) -> list:
    assert path.is_file(), f"missing {path.relative_to(REPO)}"
    instructions = parse_dockerfile(path)
    images = resolved_from_images(instructions)
    assert len(images) >= 2, "multi-stage build expected (build stage + runtime stage)"
    assert all(image == PYTHON_BASE_IMAGE for image in images), images

    syncs = uv_sync_commands(instructions)
    assert len(syncs) == 1, "one `uv sync` installs the image's package"
    (sync,) = syncs
    assert flag_value(sync, "--package") == package
    for flag in ("--frozen", "--no-dev", "--no-editable"):
        assert flag in sync, f"uv sync without {flag}"

    # The runtime stage: non-root, the container port, a health check, the module to run.
    runtime = instructions[max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM") :]
    users = [ins.args for ins in runtime if ins.keyword == "USER"]
    assert users, "the runtime stage should switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [ins.args for ins in runtime if ins.keyword == "EXPOSE"] == [str(CONTAINER_PORT)]
    assert any(ins.keyword == "HEALTHCHECK" for ins in runtime)
    (cmd_ins,) = [ins for ins in runtime if ins.keyword == "CMD"]
    assert exec_form(cmd_ins.args) == cmd
    return runtime


@pytest.mark.parametrize("service", SERVICES)
def test_service_dockerfile(service: str) -> None:
    service_dir = REPO / "services" / service
    assert _project_name(service_dir) == distribution(service)
    assert (service_dir / module(service) / "__init__.py").is_file()

    runtime = _check_image(
        dockerfile_path(service), distribution(service), ["python", "-m", module(service)]
    )
    (healthcheck,) = [ins.args for ins in runtime if ins.keyword == "HEALTHCHECK"]
    assert f"127.0.0.1:{CONTAINER_PORT}/healthz" in healthcheck
    # The image listens on all interfaces by default, with the service's own prefix.
    env = " ".join(ins.args for ins in runtime if ins.keyword == "ENV")
    _, host_var, port_var = service_env(service)
    assert f"{host_var}=0.0.0.0" in env
    assert f"{port_var}={CONTAINER_PORT}" in env


def test_gateway_dockerfile() -> None:
    localstack = REPO / "libs" / "localstack"
    assert _project_name(localstack) == "billstream-localstack"
    package_dir = _module_dir(GATEWAY_MODULE)
    assert package_dir is not None and package_dir.parent == localstack
    _check_image(GATEWAY_DOCKERFILE, "billstream-localstack", ["python", "-m", GATEWAY_MODULE])


def test_gateway_module_exists() -> None:
    package_dir = _module_dir(GATEWAY_MODULE)
    assert package_dir is not None
    submodule = GATEWAY_MODULE.split(".", 1)[1]
    assert (package_dir / f"{submodule}.py").is_file() or (
        package_dir / submodule / "__main__.py"
    ).is_file(), f"`python -m {GATEWAY_MODULE}` has nothing to run"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".billstream", ".git", "tests", "bench/results"):
        assert required in patterns, f".dockerignore should exclude {required}"
    assert "**/__pycache__" in patterns or "__pycache__" in patterns
    # The images need these: never exclude them.
    for kept in ("uv.lock", "pyproject.toml", "libs", "services"):
        assert kept not in patterns
