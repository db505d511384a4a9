"""k8s mode: one vLLM Deployment + Service per model, rendered with the kubernetes client's
models and applied through its API; readiness is then checked over HTTP like a local engine.

The model files must be where the engine pod can read them: the service's artifact cache is a
PersistentVolumeClaim (``INFERENCE_K8S_MODELS_PVC``) mounted at the same path in this service's
pod and, read-only, in every engine pod, so a fetched model's path is valid in both.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from kubernetes import client as k8s

from services.inference.engines.base import EngineHandle, EngineSpec, EngineStartError
from services.inference.engines.local import vllm_argv
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

ENGINE_PORT = 8000
APP_LABEL = "tuneloop-engine"


def k8s_name(deployment_id: str) -> str:
    """A DNS-1123 label for a deployment id."""
    name = re.sub(r"[^a-z0-9-]", "-", f"tl-{deployment_id}".lower()).strip("-")
    return name[:63].rstrip("-")


def labels(spec: EngineSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_LABEL,
        "app.kubernetes.io/managed-by": "tuneloop-inference",
        "tuneloop.dev/deployment-id": k8s_name(spec.deployment_id),
    }


def render_deployment(
    spec: EngineSpec, *, namespace: str, image: str, models_pvc: str, models_mount: str
) -> k8s.V1Deployment:
    name = k8s_name(spec.deployment_id)
    # The image's entrypoint is the OpenAI server: pass only its arguments.
    args = vllm_argv("python", spec, host="0.0.0.0", port=ENGINE_PORT)[3:]  # noqa: S104 (in a pod)
    profile = spec.profile
    resources = k8s.V1ResourceRequirements(
        limits={"nvidia.com/gpu": str(profile.tensor_parallel_size)}
        if profile.device == "gpu"
        else None,
    )
    env = [
        k8s.V1EnvVar(name="VLLM_ALLOW_RUNTIME_LORA_UPDATING", value="True"),
        k8s.V1EnvVar(name="VLLM_NO_USAGE_STATS", value="1"),
        k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
    ]
    if profile.device == "cpu":
        env.append(k8s.V1EnvVar(name="VLLM_CPU_KVCACHE_SPACE", value=str(profile.cpu_kv_cache_gib)))
    container = k8s.V1Container(
        name="vllm",
        image=image,
        args=args,
        ports=[k8s.V1ContainerPort(container_port=ENGINE_PORT, name="http")],
        env=env,
        resources=resources,
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/health", port=ENGINE_PORT),
            period_seconds=5,
            failure_threshold=3,
        ),
        startup_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/health", port=ENGINE_PORT),
            period_seconds=5,
            failure_threshold=120,  # ten minutes to load weights
        ),
        volume_mounts=[
            k8s.V1VolumeMount(name="models", mount_path=models_mount, read_only=True),
            k8s.V1VolumeMount(name="shm", mount_path="/dev/shm"),  # noqa: S108 (vLLM IPC)
        ],
        security_context=k8s.V1SecurityContext(allow_privilege_escalation=False),
    )
    pod = k8s.V1PodSpec(
        containers=[container],
        volumes=[
            k8s.V1Volume(
                name="models",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=models_pvc, read_only=True
                ),
            ),
            k8s.V1Volume(name="shm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")),
        ],
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
        if profile.device == "gpu"
        else None,
        termination_grace_period_seconds=30,
    )
    meta = k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels(spec))
    return k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=meta,
        spec=k8s.V1DeploymentSpec(
            replicas=1,
            selector=k8s.V1LabelSelector(match_labels=labels(spec)),
            strategy=k8s.V1DeploymentStrategy(type="Recreate"),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels(spec)), spec=pod
            ),
        ),
    )


def render_service(spec: EngineSpec, *, namespace: str) -> k8s.V1Service:
    name = k8s_name(spec.deployment_id)
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels(spec)),
        spec=k8s.V1ServiceSpec(
            selector=labels(spec),
            ports=[k8s.V1ServicePort(name="http", port=ENGINE_PORT, target_port=ENGINE_PORT)],
        ),
    )


def endpoint_of(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{ENGINE_PORT}/v1"


def to_manifest(obj: Any) -> dict[str, Any]:
    """A rendered model as the plain dict ``kubectl apply`` would take."""
    result: dict[str, Any] = k8s.ApiClient().sanitize_for_serialization(obj)
    return result


class K8sEngines:
    """Engines as Kubernetes objects (in-cluster config, or the local kubeconfig)."""

    mode = "k8s"

    def __init__(self, settings: InferenceSettings, *, models_mount: str | None = None) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self.models_mount = models_mount or "/var/lib/tuneloop"
        self._apps: Any = None
        self._core: Any = None

    def _api(self) -> tuple[Any, Any]:
        if self._apps is None:
            from kubernetes import config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._apps, self._core = k8s.AppsV1Api(), k8s.CoreV1Api()
        return self._apps, self._core

    def _apply(self, spec: EngineSpec) -> EngineHandle:
        apps, core = self._api()
        deployment = render_deployment(
            spec,
            namespace=self.namespace,
            image=self.settings.k8s_image,
            models_pvc=self.settings.k8s_models_pvc,
            models_mount=self.models_mount,
        )
        service = render_service(spec, namespace=self.namespace)
        name = k8s_name(spec.deployment_id)
        try:
            apps.create_namespaced_deployment(self.namespace, deployment)
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise EngineStartError(f"creating Deployment {name}: {exc.reason}") from exc
            apps.replace_namespaced_deployment(name, self.namespace, deployment)
        try:
            core.create_namespaced_service(self.namespace, service)
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise EngineStartError(f"creating Service {name}: {exc.reason}") from exc
        return EngineHandle(
            deployment_id=spec.deployment_id,
            endpoint=endpoint_of(name, self.namespace),
            k8s_name=name,
        )

    async def start(self, spec: EngineSpec) -> EngineHandle:
        if not self.settings.k8s_apply:
            raise EngineStartError("k8s mode with INFERENCE_K8S_APPLY=false: render only")
        return await asyncio.to_thread(self._apply, spec)

    def alive(self, handle: EngineHandle) -> bool:
        if not handle.k8s_name:
            return False
        apps, _ = self._api()
        try:
            dep = apps.read_namespaced_deployment(handle.k8s_name, self.namespace)
        except k8s.ApiException:
            return False
        return dep.metadata.deletion_timestamp is None

    def _delete(self, name: str) -> None:
        apps, core = self._api()
        for call in (apps.delete_namespaced_deployment, core.delete_namespaced_service):
            try:
                call(name, self.namespace)
            except k8s.ApiException as exc:
                if exc.status != 404:
                    raise

    async def stop(self, handle: EngineHandle) -> None:
        if handle.k8s_name:
            await asyncio.to_thread(self._delete, handle.k8s_name)

    async def log_tail(self, handle: EngineHandle, max_bytes: int) -> bytes:
        if not handle.k8s_name:
            return b""

        def read() -> bytes:
            _, core = self._api()
            selector = f"tuneloop.dev/deployment-id={handle.k8s_name}"
            pods = core.list_namespaced_pod(self.namespace, label_selector=selector).items
            chunks = []
            for pod in pods:
                text = core.read_namespaced_pod_log(
                    pod.metadata.name, self.namespace, limit_bytes=max_bytes
                )
                chunks.append(str(text).encode())
            return b"\n".join(chunks)[-max_bytes:]

        try:
            return await asyncio.to_thread(read)
        except Exception as exc:
            return f"(could not read pod logs: {exc!r})".encode()

    async def stop_all(self) -> None:
        """Engines in a cluster outlive this service by design; the next start re-adopts."""
