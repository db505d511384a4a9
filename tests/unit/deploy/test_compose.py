"""compose.yaml: valid against the Compose Specification schema (test data), and consistent:
every dependency exists and is waited for properly, every tuneloop service is built from its
own Dockerfile and health-checked, GPUs are reserved where models run, NATS fsyncs every write."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from shared.embedded import venv_bin
from tests.unit.deploy.manifests import (
    GPU_SERVICES,
    ROOT,
    SCHEMAS,
    SERVICES,
    compose,
    compose_env,
    dockerfile_stages,
)

INFRA = ("nats", "postgres", "gcs", "jaeger")


@functools.cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    cls = jsonschema.Draft201909Validator
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_validates_against_the_compose_spec() -> None:
    compose_validator().validate(compose())


def test_compose_schema_validation_is_not_vacuous() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError):
        compose_validator().validate(broken)
    wrong = copy.deepcopy(compose())
    wrong["services"]["trainer"]["depends_on"]["nats"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        compose_validator().validate(wrong)


def test_all_six_services_and_the_infrastructure_are_there() -> None:
    services = compose()["services"]
    assert set(SERVICES) | set(INFRA) | {"migrate"} == set(services)


def test_dependencies_exist_and_healthy_ones_have_health_checks() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", dep


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_built_from_its_dockerfile_and_health_checked(service: str) -> None:
    svc = compose()["services"][service]
    build = svc["build"]
    assert build["context"] == "."
    path = ROOT / build["dockerfile"]
    assert path == ROOT / "services" / service / "Dockerfile" and path.is_file()
    if "target" in build:
        assert build["target"] in dockerfile_stages(path)
    assert svc["image"].startswith("tuneloop/")
    test = svc["healthcheck"]["test"]
    port = compose_env(service)[f"{service.upper()}_HTTP_PORT"]
    assert test[0] == "CMD" and f"127.0.0.1:{port}/readyz" in " ".join(test)
    deps = svc["depends_on"]
    for infra in ("nats", "postgres", "gcs"):
        assert deps[infra]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_gpus_are_reserved_for_the_model_services_only() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        reservations = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
        devices = reservations.get("devices", [])
        gpu = any("gpu" in d.get("capabilities", []) for d in devices)
        assert gpu == (name in (*GPU_SERVICES, "inference")), name
        if gpu:
            assert devices[0]["driver"] == "nvidia"


def test_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc["image"]
        assert re.search(r":[^/:]*\d[^/:]*$", image) and not image.endswith(":latest"), name


def test_only_the_gateway_is_published_beyond_this_host() -> None:
    published = {n: s["ports"] for n, s in compose()["services"].items() if s.get("ports")}
    assert published.pop("gateway") == ["8080:8080"]
    # The CLI's way in (broker, uploads) and the trace UI: loopback only.
    assert set(published) == {"nats", "ingest", "jaeger"}
    for name, ports in published.items():
        assert all(p.startswith("127.0.0.1:") for p in ports), name


def _nats_config() -> str:
    (script,) = compose()["services"]["nats"]["command"]
    match = re.search(r"<<'EOF'\n(.*?)\nEOF\n", script, re.S)
    assert match, "nats.conf heredoc"
    return match.group(1)


def test_nats_fsyncs_every_write_and_its_config_is_valid(tmp_path: Path) -> None:
    conf = _nats_config()
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M)
    assert "store_dir: /data" in conf
    volumes = compose()["services"]["nats"]["volumes"]
    assert any(v.endswith(":/data") for v in volumes)
    path = tmp_path / "nats.conf"
    path.write_text(conf.replace("/data", str(tmp_path / "data")))
    check = subprocess.run(
        [venv_bin("nats-server"), "-c", str(path), "-t"], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_database_url_matches_the_postgres_service() -> None:
    services = compose()["services"]
    pg = services["postgres"]["environment"]
    url = compose_env("gateway")["DATABASE_URL"]
    expected = (
        f"postgresql+asyncpg://{pg['POSTGRES_USER']}:tuneloop-dev@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert url == expected
    assert compose_env("migrate")["DATABASE_URL"] == url


def _env_of(svc: dict[str, Any]) -> dict[str, Any]:
    env: dict[str, Any] = svc.get("environment", {})
    return env


def test_artifacts_go_to_the_emulator_unless_told_otherwise() -> None:
    env = compose_env("trainer")
    assert env["TUNELOOP_ARTIFACT_STORE_URL"].startswith("gs://")
    assert env["STORAGE_EMULATOR_HOST"] == "http://gcs:9023"
    # STORAGE_EMULATOR_HOST= (set but empty) switches to real GCS: "-" not ":-".
    raw = _env_of(compose()["services"]["trainer"])["STORAGE_EMULATOR_HOST"]
    assert raw == "${STORAGE_EMULATOR_HOST-http://gcs:9023}"


def test_engines_are_announced_at_an_address_peers_reach() -> None:
    # Local engines bind and announce http://<INFERENCE_HOST>:<port>/v1
    # (services/inference/engines/local.py): the container's own name on the compose network.
    assert compose_env("inference")["INFERENCE_HOST"] == "inference"
    assert "inference" in compose()["services"]
