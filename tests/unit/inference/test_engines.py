"""Engine command lines, profiles and the Kubernetes rendering (no cluster needed)."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

from services.inference.engines.base import EngineSpec
from services.inference.engines.k8s import (
    endpoint_of,
    k8s_name,
    render_deployment,
    render_service,
    to_manifest,
)
from services.inference.engines.local import llama_cpp_argv, pid_serves, vllm_argv
from services.inference.engines.profiles import PROFILES, ProfileError, get_profile
from services.inference.handlers import announced_engine
from services.inference.settings import InferenceSettings
from services.inference.state import safe_id


def spec(profile: str = "cpu", **fields) -> EngineSpec:
    values = {
        "deployment_id": "dep-0123456789abcdef",
        "kind": "vllm",
        "model_path": "/models/m",
        "served_names": ("tuneloop", "dep-0123456789abcdef"),
        "profile": get_profile(profile),
    }
    values.update(fields)
    return EngineSpec(**values)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_vllm_command_uses_the_module_entry_point_float32_eager_and_lora():
    argv = vllm_argv("/venv/bin/python", spec(enable_lora=True), host="127.0.0.1", port=9000)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--dtype") == "float32" and "--enforce-eager" in argv
    assert argv[argv.index("--served-model-name") + 1 : argv.index("--served-model-name") + 3] == [
        "tuneloop",
        "dep-0123456789abcdef",
    ]
    assert flag(argv, "--max-lora-rank") == "64" and "--enable-lora" in argv
    # No GPU-only flags on a CPU.
    assert "--gpu-memory-utilization" not in argv and "--tensor-parallel-size" not in argv


def test_gpu_profiles_carry_their_settings():
    argv = vllm_argv("py", spec("2xt4"), host="0.0.0.0", port=8000)
    assert flag(argv, "--tensor-parallel-size") == "2" and flag(argv, "--dtype") == "float16"
    q = vllm_argv("py", spec("quantized"), host="h", port=1)
    assert flag(q, "--quantization") == "compressed-tensors"
    assert "--enforce-eager" in vllm_argv("py", spec("spot"), host="h", port=1)
    assert "--enable-lora" not in q


def test_llama_cpp_command():
    argv = llama_cpp_argv(
        "py",
        spec(kind="llama-cpp", model_path="/m/x.gguf", served_names=("tuneloop",)),
        host="127.0.0.1",
        port=7,
    )
    assert argv[:3] == ["py", "-m", "llama_cpp.server"]
    assert flag(argv, "--model") == "/m/x.gguf" and flag(argv, "--model_alias") == "tuneloop"
    assert flag(argv, "--n_ctx") == "1024"


def test_profiles_can_be_overridden_but_not_renamed_or_broken():
    p = get_profile("cpu", {"max_model_len": 512})
    assert p.max_model_len == 512 and p.device == "cpu"
    with pytest.raises(ProfileError, match="unknown engine profile"):
        get_profile("h100-please")
    with pytest.raises(ProfileError, match="cannot be overridden"):
        get_profile("cpu", {"device": "gpu"})
    for bad in (
        {"max_model_len": -1},
        {"gpu_memory_utilization": 7},
        {"dtype": "int3"},
        {"quantization": "awq; rm -rf /"},
        {"nope": 1},
    ):
        with pytest.raises(ProfileError):
            get_profile("cpu", bad)
    assert set(PROFILES) == {"cpu", "l4", "spot", "2xt4", "quantized"}


def test_settings_pick_a_profile_and_validate(monkeypatch):
    assert InferenceSettings(gpu=False).profile_name() == "cpu"
    assert InferenceSettings(gpu=True).profile_name() == "l4"
    assert InferenceSettings(profile="spot").profile_name() == "spot"
    monkeypatch.setenv("INFERENCE_PROFILE_OVERRIDES", '{"max_model_len": 256}')
    assert InferenceSettings().profile_overrides == {"max_model_len": 256}
    with pytest.raises(ValueError, match="served_model_name"):
        InferenceSettings(served_model_name="bad name/../x")
    with pytest.raises(ValueError, match="one line"):
        InferenceSettings(baseline_model="tiny\n--evil")
    with pytest.raises(ValueError, match="max_engines"):
        InferenceSettings(max_engines=0)


def test_ids_and_engine_names():
    assert safe_id("org/model name", prefix="base-") == "base-org-model-name"
    long = safe_id("x" * 500, prefix="base-")
    assert len(long) <= 120 and long.startswith("base-x")
    assert announced_engine("vllm", PROFILES["cpu"]) == "vllm-cpu"
    assert announced_engine("vllm", PROFILES["l4"]) == "vllm"
    assert announced_engine("llama-cpp", PROFILES["cpu"]) == "llama-cpp"
    assert announced_engine("llama-cpp", PROFILES["l4"]) == "llama-cpp"


def test_a_pid_is_only_ours_if_its_command_line_names_the_deployment():
    import os

    assert not pid_serves(os.getpid(), "dep-not-in-my-argv")
    assert not pid_serves(2**22 + 7, "dep-x")


def test_k8s_deployment_and_service_render_for_a_gpu_profile():
    s = spec("l4")
    dep = render_deployment(
        s,
        namespace="tl",
        image="vllm/vllm-openai:v0.32.0",
        models_pvc="models",
        models_mount="/var/lib/tuneloop",
    )
    assert isinstance(dep, k8s.V1Deployment)
    name = k8s_name(s.deployment_id)
    assert dep.metadata.name == name == "tl-dep-0123456789abcdef"
    c = dep.spec.template.spec.containers[0]
    assert c.image == "vllm/vllm-openai:v0.32.0"
    assert c.args[:2] == ["--model", "/models/m"] and flag(c.args, "--port") == "8000"
    assert flag(c.args, "--host") == "0.0.0.0"
    assert c.resources.limits == {"nvidia.com/gpu": "1"}
    assert c.readiness_probe.http_get.path == "/health"
    assert dep.spec.selector.match_labels == dep.spec.template.metadata.labels
    claim = dep.spec.template.spec.volumes[0].persistent_volume_claim
    assert claim.claim_name == "models" and claim.read_only
    assert dep.spec.template.spec.tolerations[0].key == "nvidia.com/gpu"
    svc = render_service(s, namespace="tl")
    assert svc.spec.selector == dep.spec.template.metadata.labels
    assert svc.spec.ports[0].port == 8000
    assert endpoint_of(name, "tl") == f"http://{name}.tl.svc.cluster.local:8000/v1"
    manifest = to_manifest(dep)
    assert manifest["kind"] == "Deployment" and manifest["apiVersion"] == "apps/v1"
    assert (
        manifest["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 8000
    )


def test_k8s_cpu_rendering_has_no_gpu_and_sets_the_kv_cache():
    c = render_deployment(
        spec("cpu"), namespace="n", image="i", models_pvc="p", models_mount="/m"
    ).spec.template.spec.containers[0]
    assert c.resources.limits is None
    assert {e.name: e.value for e in c.env}["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.parametrize(
    "deployment_id", ["DEP_UPPER.with.dots", "x" * 200, "dep-:weird::id", "-leading"]
)
def test_k8s_names_are_valid_dns_labels_for_any_deployment_id(deployment_id):
    import re

    name = k8s_name(deployment_id)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name), name
