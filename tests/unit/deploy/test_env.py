"""The environment variables the services read are set in compose.yaml and in every k8s overlay,
and every TUNELOOP_*/<SERVICE>_* variable set there is read by something (no typos, no stale
names). The names come from the code: CommonSettings, each service's BaseSettings, and direct
os.environ reads in shared/ and services/."""

from __future__ import annotations

import functools

import pytest

from tests.unit.deploy.manifests import (
    COMMON_REQUIRED_ENV,
    OVERLAYS,
    SERVICES,
    bind_address_envs,
    common_settings_env,
    compose_env,
    container_env,
    env_read_in_code,
    rendered,
    service_container,
    service_settings,
    settings_fields,
)

# Bind address inside containers. The gateway reads TUNELOOP_HTTP_HOST, the evaluator
# EVALUATOR_HTTP_HOST; the rest still bind 127.0.0.1 (shared.service.run_service's default),
# which the change requested in shared/ (CommonSettings.http_host) will fix for all.
BIND_ADDRESS = {"TUNELOOP_HTTP_HOST", *(f"{s.upper()}_HTTP_HOST" for s in SERVICES)}
PREFIXES = ("TUNELOOP_", *(f"{s.upper()}_" for s in SERVICES))


def required_env(service: str) -> set[str]:
    required = {*COMMON_REQUIRED_ENV, f"{service.upper()}_HTTP_PORT"}
    for cls in service_settings(service):
        for names, is_required in settings_fields(cls).values():
            if is_required:
                required.add(sorted(names)[0])
    return required


@functools.cache
def known_env() -> frozenset[str]:
    known = common_settings_env() | env_read_in_code() | BIND_ADDRESS
    for service in SERVICES:
        for cls in service_settings(service):
            for names, _ in settings_fields(cls).values():
                known |= names
    return frozenset(known)


@functools.cache
def _k8s_env(overlay: str, service: str) -> dict[str, str | None]:
    objs = rendered(overlay)
    return container_env(objs, service_container(objs, service))


def k8s_env(overlay: str, service: str) -> dict[str, str | None]:
    return dict(_k8s_env(overlay, service))


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_what_the_service_reads(service: str) -> None:
    missing = required_env(service) - set(compose_env(service))
    assert not missing, f"compose.yaml {service}: {sorted(missing)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_k8s_sets_what_the_service_reads(overlay: str, service: str) -> None:
    missing = required_env(service) - set(k8s_env(overlay, service))
    assert not missing, f"k8s/{overlay} {service}: {sorted(missing)}"


def test_every_variable_set_is_read_by_something() -> None:
    known = known_env()
    assert {"TUNELOOP_NATS_URL", "DATABASE_URL", "TUNELOOP_SPAN_FILE"} <= known
    for service in SERVICES:
        sets = set(compose_env(service))
        for overlay in OVERLAYS:
            sets |= set(k8s_env(overlay, service))
        unknown = {v for v in sets if v.startswith(PREFIXES)} - known
        assert not unknown, f"{service}: nothing reads {sorted(unknown)}"


def test_unknown_variables_would_be_caught() -> None:
    assert "TUNELOOP_NATS_ULR" not in known_env()
    assert "GATEWAY_HTTP_PROT" not in known_env()


@pytest.mark.parametrize("service", SERVICES)
def test_services_listen_on_all_interfaces_in_containers(service: str) -> None:
    names = bind_address_envs(service)
    if not names:
        pytest.xfail(f"{service} has no bind-address setting yet: it listens on 127.0.0.1")
    envs: list[dict[str, str | None]] = [dict(compose_env(service))]
    envs += [k8s_env(o, service) for o in OVERLAYS]
    for env in envs:
        assert any(env.get(n) == "0.0.0.0" for n in names), (service, sorted(names))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_compose_and_k8s_agree_on_the_shape_of_the_settings(overlay: str) -> None:
    for service in SERVICES:
        c, k = compose_env(service), k8s_env(overlay, service)
        assert c["TUNELOOP_NATS_URL"].startswith("nats://")
        assert (k["TUNELOOP_NATS_URL"] or "").startswith("nats://")
        assert c["TUNELOOP_HOME"] == k["TUNELOOP_HOME"] == "/var/lib/tuneloop"
        assert c[f"{service.upper()}_HTTP_PORT"] == k[f"{service.upper()}_HTTP_PORT"]
        assert c["TUNELOOP_ARTIFACT_STORE_URL"].startswith("gs://")
        assert (k["TUNELOOP_ARTIFACT_STORE_URL"] or "").startswith("gs://")
    # Production refuses the development admin key; dev mode is explicit everywhere.
    dev_mode = k8s_env(overlay, "gateway")["TUNELOOP_DEV_MODE"]
    assert dev_mode == ("true" if overlay == "dev" else "false")
