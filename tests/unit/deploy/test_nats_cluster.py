"""The k8s NATS configuration, run for real: three nats-server processes from the rendered
ConfigMap (addresses moved to loopback ports, nothing else changed) form one JetStream cluster
that keeps a three-replica stream. Offline: real binaries, 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from shared.bus import BusSettings, EventBus
from shared.embedded import free_port, venv_bin, wait_for_port
from tests.unit.deploy.manifests import by_kind, rendered


def loopback_config(conf: str, index: int, ports: list[dict[str, int]], store: Path) -> str:
    """The ConfigMap's nats.conf for pod nats-<index>, with cluster DNS names and ports swapped
    for 127.0.0.1 and free ports (and the data/pid paths for a temporary directory)."""
    mine = ports[index]
    out = "host: 127.0.0.1\n" + conf
    out = re.sub(r"(?m)^port: 4222$", f"port: {mine['client']}", out)
    out = re.sub(r"(?m)^http_port: 8222$", f"http_port: {mine['monitor']}", out)
    out = out.replace("store_dir: /data", f'store_dir: "{store / "data"}"')
    out = out.replace("/var/run/nats/nats.pid", str(store / "nats.pid"))
    out = out.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{mine['cluster']}")
    for i, p in enumerate(ports):
        out = out.replace(f"nats://nats-{i}.nats-headless:6222", f"nats://127.0.0.1:{p['cluster']}")
    assert "nats-headless" not in out and "0.0.0.0" not in out
    return out


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    config_maps = by_kind(rendered("gpu"), "ConfigMap")
    conf = next(c for n, c in config_maps.items() if n.startswith("nats-config"))["data"][
        "nats.conf"
    ]
    replicas = by_kind(rendered("gpu"), "StatefulSet")["nats"]["spec"]["replicas"]
    ports = [
        {"client": free_port(), "cluster": free_port(), "monitor": free_port()}
        for _ in range(replicas)
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(replicas):
            store = tmp_path_factory.mktemp(f"nats-{i}")
            path = store / "nats.conf"
            path.write_text(loopback_config(conf, i, ports, store))
            env = {
                **os.environ,
                "POD_NAME": f"nats-{i}",
                "CLUSTER_ADVERTISE": f"127.0.0.1:{ports[i]['cluster']}",
            }
            log = (store / "nats.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [venv_bin("nats-server"), "-c", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        for proc, p in zip(procs, ports, strict=True):
            wait_for_port(p["client"], proc=proc, what="nats-server", timeout_s=120)
        yield [f"nats://127.0.0.1:{p['client']}" for p in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def _add_stream_when_cluster_is_ready(url: str, config: StreamConfig) -> int:
    """Create the stream once the cluster has elected its meta leader (seconds when idle; give
    a loaded machine two minutes) and return how many servers hold it."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 120
        while True:
            try:
                await js.add_stream(config)
                info = await js.stream_info(config.name or "")
                break
            except (APIError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
        assert info.cluster is not None
        return 1 + len(info.cluster.replicas or [])
    finally:
        await nc.close()


async def test_the_k8s_nats_config_forms_a_jetstream_cluster(nats_cluster: list[str]) -> None:
    config = StreamConfig(name="DEPLOYCHECK", subjects=["deploycheck.>"], num_replicas=3)
    assert await _add_stream_when_cluster_is_ready(nats_cluster[1], config) == 3
    # Every server serves it: publish through one, read the stream's state through another.
    nc = await nats.connect(nats_cluster[2])
    try:
        ack = await nc.jetstream().publish("deploycheck.x", b"1")
        assert ack.stream == "DEPLOYCHECK"
    finally:
        await nc.close()
    nc = await nats.connect(nats_cluster[0])
    try:
        info = await nc.jetstream().stream_info("DEPLOYCHECK")
        assert info.state.messages == 1
    finally:
        await nc.close()


async def test_services_keep_the_pipeline_stream_replicated(nats_cluster: list[str]) -> None:
    prefix = "deployr3"
    settings = BusSettings(nats_url=nats_cluster[0], prefix=prefix, stream_replicas=3)
    bus = EventBus(settings, service="deploycheck")
    config = StreamConfig(name=bus.ns.stream, subjects=[bus.ns.all_subjects], num_replicas=3)
    assert await _add_stream_when_cluster_is_ready(nats_cluster[0], config) == 3
    await bus.start()  # what every service does at start-up
    await bus.close()
    nc = await nats.connect(nats_cluster[0])
    try:
        info = await nc.jetstream().stream_info(bus.ns.stream)
        assert info.config.num_replicas == 3
    finally:
        await nc.close()
