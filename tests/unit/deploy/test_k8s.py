"""k8s/: every overlay renders with the real kustomize, every object validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and KEDA's ScaledObject
schema (test data), and the objects agree with each other and with the code."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.bus import BusSettings, EventBus
from shared.embedded import venv_bin
from shared.events import DatasetReady, TrainingDone
from shared.subjects import Namespace
from tests.unit.deploy.manifests import (
    EXTERNAL_SECRETS,
    GPU_SERVICES,
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    SCHEMAS,
    SERVICES,
    bind_address_envs,
    by_kind,
    containers,
    custom_durables,
    kubectl,
    kustomize,
    labels_match,
    pod_spec,
    probe_target,
    rendered,
    workloads,
)

CONSUMED_BY = {"trainer": DatasetReady, "quantizer": TrainingDone}


@functools.cache
def keda_validator() -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load((SCHEMAS / "keda-scaledobject-v1alpha1.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def _definitions(version: str) -> Any:
    from referencing import Registry, Resource

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = root / f"v{version}-local-strict"
    assert folder.is_dir(), f"kubernetes-validate has no schemas for {version}"
    defs = Resource.from_contents(json.loads((folder / "_definitions.json").read_text()))
    return folder, defs @ Registry()


@functools.cache
def k8s_validator(api_version: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema for one kind, loaded once (the package's own
    ``validate`` re-reads its 1.4 MB definitions file for every object)."""
    from referencing import Resource

    folder, registry = _definitions(version)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = folder / f"{kind.lower()}-{group_version}.json"
    assert path.is_file(), f"no schema for {kind} {api_version} in Kubernetes {version}"
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(
        schema, registry=Resource.from_contents(schema) @ registry
    )


def validate(obj: dict[str, Any], version: str) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        keda_validator().validate(obj)
    else:
        k8s_validator(obj["apiVersion"], obj["kind"], version).validate(obj)


def test_cached_validation_agrees_with_kubernetes_validate() -> None:
    objs = rendered("dev")
    gateway = by_kind(objs, "Deployment")["gateway"]
    kubernetes_validate.validate(gateway, KUBERNETES_VERSIONS[0], strict=True)
    validate(gateway, KUBERNETES_VERSIONS[0])
    bad = copy.deepcopy(gateway)
    bad["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, KUBERNETES_VERSIONS[0])


# ------------------------------------------------------------------------------ render + schema


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace(overlay: str) -> None:
    objs = rendered(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "tuneloop", o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tuneloop"
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str, version: str) -> None:
    for obj in rendered(overlay):
        try:
            validate(obj, version)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_schema_validation_is_not_vacuous() -> None:
    """The validators reject what the API server would: an unknown field, a wrong type, a
    ScaledObject with a number where KEDA wants a string, a nats-jetstream trigger without its
    consumer."""
    objs = rendered("gpu")
    gateway = by_kind(objs, "Deployment")["gateway"]
    so = by_kind(objs, "ScaledObject")["trainer"]
    version = KUBERNETES_VERSIONS[0]

    unknown = copy.deepcopy(gateway)
    unknown["spec"]["replica"] = 2
    wrong_type = copy.deepcopy(gateway)
    pod_spec(wrong_type)["containers"][0]["ports"][0]["containerPort"] = "eighty"
    for bad in (unknown, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, version)

    number = copy.deepcopy(so)
    number["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1
    no_consumer = copy.deepcopy(so)
    del no_consumer["spec"]["triggers"][0]["metadata"]["consumer"]
    typo = copy.deepcopy(so)
    typo["spec"]["minReplicas"] = 0
    for bad in (number, no_consumer, typo):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, version)


def test_kustomize_failure_surfaces(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(subprocess.CalledProcessError):
        kustomize(tmp_path)


# ------------------------------------------------------------------------------ cross references


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_pods_and_named_ports(overlay: str) -> None:
    objs = rendered(overlay)
    pods = [
        pod_spec(w) | {"_labels": w["spec"]["template"]["metadata"]["labels"]}
        for w in workloads(objs)
    ]
    for svc in by_kind(objs, "Service").values():
        selected = [p for p in pods if labels_match(svc["spec"]["selector"], p["_labels"])]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in selected:
                declared = {
                    (p.get("name"), p["containerPort"])
                    for c in pod["containers"]
                    for p in c.get("ports", [])
                }
                ok = any(target in (name, number) for name, number in declared)
                assert ok, f"Service {svc['metadata']['name']} targets {target!r}, not declared"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_declared_ports(overlay: str) -> None:
    for workload in workloads(rendered(overlay)):
        for c in containers(workload):
            ports = {p.get("name") for p in c.get("ports", [])} | {
                p["containerPort"] for p in c.get("ports", [])
            }
            numbers = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                spec = c.get(probe, {})
                http = spec.get("httpGet")
                if http:
                    assert http["port"] in ports, (workload["metadata"]["name"], probe)
                elif "exec" in spec and "http://127.0.0.1" in " ".join(spec["exec"]["command"]):
                    _, port, _ = probe_target(spec, numbers)
                    assert port in numbers.values(), (workload["metadata"]["name"], probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_deployments_probe_health_and_readiness(overlay: str) -> None:
    deployments = by_kind(rendered(overlay), "Deployment")
    for name in SERVICES:
        (app,) = pod_spec(deployments[name])["containers"]
        assert app["image"].startswith(f"tuneloop/{name}:")
        env = {e["name"]: e.get("value") for e in app.get("env", [])}
        (http,) = [p for p in app["ports"] if p["name"] == "http"]
        port = int(env[f"{name.upper()}_HTTP_PORT"] or 0)
        assert port == http["containerPort"]
        ports = {"http": port}
        targets = {
            kind: probe_target(app[kind], ports)
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert targets["readinessProbe"][:2] == ("/readyz", port), name
        assert targets["livenessProbe"][:2] == ("/healthz", port), name
        assert targets["startupProbe"][:2] == ("/healthz", port), name
        # A service bound to 127.0.0.1 (no bind-address setting) can only be probed from
        # inside its container; the kubelet's httpGet would never reach it.
        if not bind_address_envs(name):
            assert {how for _, _, how in targets.values()} == {"exec"}, name
    statefulsets = by_kind(rendered(overlay), "StatefulSet")
    for name in ("nats", "postgres"):
        (c,) = pod_spec(statefulsets[name])["containers"]
        assert "readinessProbe" in c and "livenessProbe" in c, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secret_references_resolve(overlay: str) -> None:
    objs = rendered(overlay)
    config_maps = by_kind(objs, "ConfigMap")
    secrets = {name: set(s.get("data", {})) for name, s in by_kind(objs, "Secret").items()}
    if overlay == "gpu":
        assert not secrets, "no Secret is committed for the gpu overlay"
        secrets = {k: set(v) for k, v in EXTERNAL_SECRETS.items()}
    for workload in workloads(objs):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
        for c in containers(workload):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    key = ref["secretKeyRef"]
                    assert key["key"] in secrets[key["name"]], (workload["metadata"]["name"], key)
                if "configMapKeyRef" in ref:
                    key = ref["configMapKeyRef"]
                    assert key["key"] in config_maps[key["name"]]["data"]
        sa = spec.get("serviceAccountName")
        if sa:
            assert sa in by_kind(objs, "ServiceAccount"), sa


def test_external_secret_is_documented() -> None:
    readme = (K8S / "README.md").read_text()
    for name, keys in EXTERNAL_SECRETS.items():
        assert name in readme
        for key in keys:
            assert key in readme, key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    for workload in workloads(rendered(overlay)):
        for c in containers(workload):
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[^/:]*\d[^/:]*$", image), image
            assert not image.endswith(":latest"), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_a_memory_limit(overlay: str) -> None:
    for workload in workloads(rendered(overlay)):
        for c in containers(workload):
            resources = c.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), c["name"]
            assert "memory" in resources.get("limits", {}), c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_profile(overlay: str) -> None:
    objs = rendered(overlay)
    labels = by_kind(objs, "Namespace")["tuneloop"]["metadata"]["labels"]
    # Enforced: baseline (the vLLM engine pods run the official image as root); audited and
    # warned: restricted, which every pod of ours meets.
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    for workload in workloads(objs):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in containers(workload):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]


# ------------------------------------------------------------------------------ NATS


def test_nats_is_a_three_node_jetstream_cluster_that_fsyncs_every_write(tmp_path: Path) -> None:
    objs = rendered("gpu")
    sts = by_kind(objs, "StatefulSet")["nats"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    headless = by_kind(objs, "Service")[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    config_maps = by_kind(objs, "ConfigMap")
    (config_map,) = [c for n, c in config_maps.items() if n.startswith("nats-config")]
    conf = config_map["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M)
    routes = re.findall(r"nats://([a-z0-9-]+)\.([a-z0-9-]+):6222", conf)
    assert routes == [(f"nats-{i}", headless["metadata"]["name"]) for i in range(3)]
    # The real nats-server accepts the configuration (as pod nats-0 would run it).
    (tmp_path / "nats.conf").write_text(conf)
    env = {**os.environ, "POD_NAME": "nats-0", "CLUSTER_ADVERTISE": "nats-0.nats-headless"}
    check = subprocess.run(
        [venv_bin("nats-server"), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    budget = by_kind(objs, "PodDisruptionBudget")["nats"]
    assert budget["spec"]["maxUnavailable"] == 1
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels_match(budget["spec"]["selector"]["matchLabels"], pod_labels)


def test_nats_server_rejects_a_broken_config(tmp_path: Path) -> None:
    (tmp_path / "nats.conf").write_text("jetstream { sync_interval: sometimes }\n")
    check = subprocess.run(
        [venv_bin("nats-server"), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode != 0


# ------------------------------------------------------------------------------ exposure


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_is_reachable_from_outside(overlay: str) -> None:
    objs = rendered(overlay)
    policies = by_kind(objs, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny
    pod_labels = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(objs)
    }
    for name, policy in policies.items():
        for rule in policy["spec"].get("ingress", []):
            froms = rule.get("from")
            if froms is None:
                selected = [
                    w
                    for w, labels in pod_labels.items()
                    if labels_match(policy["spec"]["podSelector"]["matchLabels"], labels)
                ]
                assert selected == ["gateway"], f"{name} opens {selected} to everyone"
                continue
            for peer in froms:
                assert "ipBlock" not in peer, name
    for svc in by_kind(objs, "Service").values():
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            assert svc["metadata"]["name"] == "gateway"


# ------------------------------------------------------------------------------ GPU + KEDA


def test_trainer_and_quantizer_scale_from_zero_on_their_consumers_lag() -> None:
    objs = rendered("gpu")
    deployments = by_kind(objs, "Deployment")
    scaled = by_kind(objs, "ScaledObject")
    assert set(scaled) == set(GPU_SERVICES)
    config_maps = by_kind(objs, "ConfigMap")
    config = next(c for n, c in config_maps.items() if n.startswith("tuneloop-config"))
    ns = Namespace(config["data"].get("TUNELOOP_SUBJECT_PREFIX", Namespace().prefix))
    headless = by_kind(objs, "Service")["nats-headless"]
    monitor_port = {p["name"]: p["port"] for p in headless["spec"]["ports"]}["monitor"]
    for name in GPU_SERVICES:
        so = scaled[name]["spec"]
        target = deployments[so["scaleTargetRef"]["name"]]
        assert target["metadata"]["name"] == name
        assert "replicas" not in target["spec"], "KEDA owns the replica count"
        assert so["minReplicaCount"] == 0 and so["maxReplicaCount"] >= 1
        (trigger,) = so["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["stream"] == ns.stream
        assert meta["account"] == "$G"
        # The consumer is the durable the service really subscribes with.
        bus = EventBus(BusSettings(prefix=ns.prefix), service=name)

        async def handler(event: Any, delivery: Any) -> None:
            return None

        durable = bus.subscribe(CONSUMED_BY[name], handler).durable
        assert meta["consumer"] in ({durable} | custom_durables(name)), (meta["consumer"], durable)
        assert meta["natsServerMonitoringEndpoint"] == (
            f"nats-headless.{target['metadata']['namespace']}.svc.cluster.local:{monitor_port}"
        )
        spec = pod_spec(target)
        assert spec["nodeSelector"] == {"tuneloop.io/node-pool": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        (app,) = spec["containers"]
        assert app["resources"]["limits"]["nvidia.com/gpu"] == 1
    # KEDA (namespace "keda") may read the monitoring port.
    nats_policy = by_kind(objs, "NetworkPolicy")["nats"]["spec"]["ingress"]
    assert any(
        {"port": "monitor"} in rule["ports"]
        and {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}
        in rule["from"]
        for rule in nats_policy
    )


def test_dev_overlay_runs_everything_on_cpu_without_keda() -> None:
    objs = rendered("dev")
    assert not by_kind(objs, "ScaledObject")
    for workload in workloads(objs):
        for c in containers(workload):
            assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {}))
    config_maps = by_kind(objs, "ConfigMap")
    config = next(c for n, c in config_maps.items() if n.startswith("tuneloop-config"))
    assert config["data"]["STORAGE_EMULATOR_HOST"] == "http://gcs:9023"
    assert "gcs" in by_kind(objs, "Service")


# ------------------------------------------------------------------------------ RBAC, HPA, PDB


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_alone_may_manage_engine_deployments(overlay: str) -> None:
    objs = rendered(overlay)
    deployments = by_kind(objs, "Deployment")
    inference = pod_spec(deployments["inference"])
    assert inference["automountServiceAccountToken"] is True
    sa = inference["serviceAccountName"]
    bindings = [
        b
        for b in by_kind(objs, "RoleBinding").values()
        if {"kind": "ServiceAccount", "name": sa}
        in [{"kind": s["kind"], "name": s["name"]} for s in b["subjects"]]
    ]
    (binding,) = bindings
    assert binding["roleRef"]["kind"] == "Role", "namespace-scoped only"
    role = by_kind(objs, "Role")[binding["roleRef"]["name"]]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("apps", "deployments", "create") in granted
    assert ("", "services", "create") in granted
    assert not any("*" in item for item in granted), "no wildcards"
    assert not any(resource == "secrets" for _, resource, _ in granted)
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    # Nobody else gets an API token.
    for name in set(SERVICES) - {"inference"}:
        spec = pod_spec(deployments[name])
        assert spec["serviceAccountName"] != sa
        account = by_kind(objs, "ServiceAccount")[spec["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False
        assert spec.get("automountServiceAccountToken") is not True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_hpa_and_disruption_budgets_target_real_workloads(overlay: str) -> None:
    objs = rendered(overlay)
    hpa = by_kind(objs, "HorizontalPodAutoscaler")["gateway"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    gateway = by_kind(objs, "Deployment")[hpa["scaleTargetRef"]["name"]]
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    for pdb in by_kind(objs, "PodDisruptionBudget").values():
        selector = pdb["spec"]["selector"]["matchLabels"]
        pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(objs)]
        assert any(labels_match(selector, labels) for labels in pods), pdb["metadata"]["name"]


# ------------------------------------------------------------------------------ vLLM engines


def engine_objects(namespace: str, image: str, pvc: str, mount: str) -> list[dict[str, Any]]:
    """An engine Deployment + Service exactly as the inference service renders them."""
    engines = pytest.importorskip("services.inference.engines.k8s")
    from services.inference.engines.base import EngineSpec
    from services.inference.engines.profiles import get_profile

    spec = EngineSpec(
        deployment_id="dep-01",
        kind="vllm",
        model_path="/var/lib/tuneloop/cache/inference/model",
        served_names=("tuneloop", "dep-01"),
        profile=get_profile("l4"),
    )
    deployment = engines.render_deployment(
        spec, namespace=namespace, image=image, models_pvc=pvc, models_mount=mount
    )
    service = engines.render_service(spec, namespace=namespace)
    return [engines.to_manifest(deployment), engines.to_manifest(service)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_the_inference_service_creates_fit_the_cluster(overlay: str) -> None:
    objs = rendered(overlay)
    inference = by_kind(objs, "Deployment")["inference"]
    (app,) = pod_spec(inference)["containers"]
    env = {e["name"]: e for e in app["env"]}
    assert env["INFERENCE_MODE"]["value"] == "k8s"
    assert env["INFERENCE_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.namespace"
    )
    image, pvc = env["INFERENCE_K8S_IMAGE"]["value"], env["INFERENCE_K8S_MODELS_PVC"]["value"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image)
    # The compose engine image is built from the same vLLM release.
    from tests.unit.deploy.manifests import dockerfile, dockerfile_stages

    engine_stage = dockerfile_stages(dockerfile("inference"))["engine"]
    assert engine_stage[0].value[0] == image
    # The service's home is the shared models claim, mounted where engines mount it.
    claims = by_kind(objs, "PersistentVolumeClaim")
    assert pvc in claims
    (home,) = [v for v in pod_spec(inference)["volumes"] if v["name"] == "home"]
    assert home == {"name": "home", "persistentVolumeClaim": {"claimName": pvc}}
    # services/inference/app.py hands the engines TUNELOOP_HOME as the models mount.
    config_maps = by_kind(objs, "ConfigMap")
    config = next(c for n, c in config_maps.items() if n.startswith("tuneloop-config"))
    home_path = config["data"]["TUNELOOP_HOME"]
    (mount,) = [m for m in app["volumeMounts"] if m["name"] == "home"]
    assert mount["mountPath"] == home_path
    engine_deployment, engine_service = engine_objects("tuneloop", image, pvc, home_path)
    engine_mounts = engine_deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"mountPath": home_path, "name": "models", "readOnly": True} in engine_mounts
    for obj in (engine_deployment, engine_service):
        for version in KUBERNETES_VERSIONS:
            validate(obj, version)
    engine_pod = engine_deployment["spec"]["template"]
    (volume,) = [v for v in engine_pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": pvc, "readOnly": True}
    # The engines' NetworkPolicy selects them and lets the gateway, evaluator and inference in.
    policy = by_kind(objs, "NetworkPolicy")["engines"]["spec"]
    assert labels_match(policy["podSelector"]["matchLabels"], engine_pod["metadata"]["labels"])
    peers = [p["podSelector"]["matchLabels"] for r in policy["ingress"] for p in r["from"]]
    for name in ("gateway", "evaluator", "inference"):
        assert {"app.kubernetes.io/name": name} in peers
    # Baseline pod security (enforced) admits them: no privilege, no host namespaces or paths.
    spec = engine_pod["spec"]
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in spec["volumes"])
    for c in spec["containers"]:
        assert not c.get("securityContext", {}).get("privileged")
    # The Role grants what the code calls (create/replace/read/delete; pod list and logs).
    role = by_kind(objs, "Role")["tuneloop-inference"]["rules"]
    granted = {
        (g, r, v)
        for rule in role
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    for need in [
        ("apps", "deployments", "create"),
        ("apps", "deployments", "update"),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "delete"),
        ("", "services", "create"),
        ("", "services", "delete"),
        ("", "pods", "list"),
        ("", "pods/log", "get"),
    ]:
        assert need in granted, need


# ------------------------------------------------------------------------------ components


def test_gcs_key_component_mounts_the_key_for_every_service(tmp_path: Path) -> None:
    """Clusters without Workload Identity add k8s/components/gcs-key to an overlay."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}/overlays/gpu]\ncomponents: [{rel}/components/gcs-key]\n"
    )
    out = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for obj in objs:
        validate(obj, KUBERNETES_VERSIONS[0])
    deployments = by_kind(objs, "Deployment")
    for name in SERVICES:
        spec = pod_spec(deployments[name])
        (app,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in app["env"]}
        key_file = Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
        (mount,) = [m for m in app["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        secret = volume["secret"]["secretName"]
        assert secret in (K8S / "README.md").read_text()
        assert key_file.name in (K8S / "components" / "gcs-key" / "kustomization.yaml").read_text()
