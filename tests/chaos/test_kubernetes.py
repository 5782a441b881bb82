"""Scenarios 6 and 8, with labels on Node objects of the fake Kubernetes API server:
the coordinator SIGKILLed and restarted during placement and during a label patch; a Node
deleted and re-created under the same name, foreign labels, 409 Conflicts on label patches."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import (
    ChaosCluster,
    Monitor,
    NodeLabelWatch,
    S3Origin,
    Sizes,
    generate,
    label_key,
    wait_for,
)
from tests.chaos.report import ScenarioRecord
from tests.fakekube import FakeKubeAPI
from tests.faultproxy import Fault, FaultProxy, Rule

NODES = ["node-1", "node-2", "node-3"]
OWNED = "datacache.io/owned-labels"


def kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "chaos"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))
    return path


def node_labels(fake: FakeKubeAPI, node: str) -> dict[str, str]:
    obj = fake.get_node(node)
    return {} if obj is None else dict(obj["metadata"].get("labels") or {})


def labelled(fake: FakeKubeAPI, short: str) -> set[str]:
    return {n for n in NODES if node_labels(fake, n).get(label_key(short)) == "ready"}


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        for node in NODES:
            api.add_node(node)
        yield api
        assert not api.server_errors, api.server_errors


@pytest.fixture
def watch(fake: FakeKubeAPI) -> Iterator[NodeLabelWatch]:
    found = NodeLabelWatch(fake.url).start()
    try:
        yield found
    finally:
        found.stop()


def converged(chaos: ChaosCluster, fake: FakeKubeAPI, short: str, count: int) -> bool:
    ready = chaos.ready(short)
    return len(ready) == count and labelled(fake, short) == ready


@pytest.mark.scenario(6, "Coordinator SIGKILLed during placement and during label patching")
def test_coordinator_killed_during_placement_and_labelling(
    chaos: ChaosCluster,
    bucket: str,
    sizes: Sizes,
    record: ScenarioRecord,
    fake: FakeKubeAPI,
    watch: NodeLabelWatch,
    tmp_path: Path,
) -> None:
    origins = {
        short: S3Origin(chaos.local.s3_endpoint, bucket, prefix=f"{short}/")
        for short in ("a", "b", "c")
    }
    for i, origin in enumerate(origins.values()):
        origin.put_all(generate(10 + i, sizes))
    with (
        FaultProxy(fake.url) as kube_proxy,
        FaultProxy(chaos.local.s3_endpoint) as s3_proxy,
    ):
        flags = (
            "--labeler=kubernetes",
            f"--kubeconfig={kubeconfig(tmp_path / 'kc', kube_proxy.url)}",
        )
        chaos.start_coordinator(*flags)
        for node in NODES:
            chaos.start_agent(node, f"--s3-endpoint-url={s3_proxy.url}")
        chaos.wait_registered(NODES)
        with Monitor(chaos, origins) as monitor:
            chaos.create("a", origins["a"].uri, replicas=2)
            wait_for(lambda: converged(chaos, fake, "a", 2), 60, "a Ready and labelled")
            holders_a = chaos.ready("a")

            def a_reads() -> int:
                return sum(1 for r in s3_proxy.requests if "/a/" in r.path and r.method == "GET")

            reads_a = a_reads()
            fetched_a = {
                n: chaos.agent_metric(n, "datacache_agent_fetched_bytes_total", dataset="default/a")
                for n in NODES
            }

            # 1. Killed while placing a new dataset.
            chaos.create("b", origins["b"].uri, replicas=2)
            chaos.local.coordinator.kill()
            record.fault(
                "SIGKILL of the coordinator right after CreateDataset returned (placement)"
            )
            restarted = time.monotonic()
            chaos.start_coordinator(*flags)
            wait_for(lambda: converged(chaos, fake, "b", 2), 60, "b Ready and labelled")
            after_placement = time.monotonic() - restarted

            # 2. Killed with a label patch applied by the API server but not yet answered.
            kube_proxy.set_rules(
                [
                    Rule(
                        Fault("latency", seconds=5),
                        method="PATCH",
                        path_contains="/api/v1/nodes/",
                        limit=1,
                    )
                ]
            )
            chaos.create("c", origins["c"].uri, replicas=1)
            wait_for(lambda: kube_proxy.counts()["latency"] >= 1, 60, "a label patch in flight")
            chaos.local.coordinator.kill()
            record.fault(
                "SIGKILL of the coordinator while its label PATCH was in flight (applied by the "
                "API server, the answer held back 5 s by a proxy)"
            )
            kube_proxy.set_rules([])
            restarted = time.monotonic()
            chaos.start_coordinator(*flags)
            wait_for(
                lambda: all(
                    converged(chaos, fake, s, n) for s, n in (("a", 2), ("b", 2), ("c", 1))
                ),
                60,
                "every dataset Ready and labelled",
            )
            after_patch = time.monotonic() - restarted
            record.recovered(
                max(after_placement, after_patch),
                "longest time from a coordinator restart to every dataset Ready and labelled "
                f"(after the placement kill {after_placement:.1f}s, after the patch kill "
                f"{after_patch:.1f}s)",
            )
            # A few more passes on the restarted coordinator.
            settle = time.monotonic()
            wait_for(lambda: time.monotonic() - settle > 3, 5, "more reconcile passes")
            monitor.finish(record)
        refetched_a = {
            n: chaos.agent_metric(n, "datacache_agent_fetched_bytes_total", dataset="default/a")
            - fetched_a[n]
            for n in NODES
        }
        extra_reads = a_reads() - reads_a
    removals = [c for c in watch.changes if c.value is None]
    record.observe(
        f"label changes seen on the Node watch: {len(watch.changes)}, of which removals: "
        f"{len(removals)}"
    )
    record.observe(
        f"dataset a (Ready on {sorted(holders_a)} before the kills): {extra_reads} S3 reads and "
        f"{sum(refetched_a.values()):.0f} bytes fetched again across both restarts"
    )
    assert watch.error is None, watch.error
    assert removals == [], removals
    assert chaos.ready("a") == holders_a
    assert extra_reads == 0 and sum(refetched_a.values()) == 0
    for node in NODES:
        obj = fake.get_node(node)
        assert obj is not None
        owned = set(filter(None, obj["metadata"].get("annotations", {}).get(OWNED, "").split(",")))
        assert owned == {k for k in node_labels(fake, node) if k.startswith("dataset.")}
    assert record.exposed == 0 and record.lost == 0


@pytest.mark.scenario(8, "Node deleted and re-created, foreign labels, 409 on label patches")
def test_node_recreated_foreign_labels_and_conflicts(
    chaos: ChaosCluster,
    bucket: str,
    sizes: Sizes,
    record: ScenarioRecord,
    fake: FakeKubeAPI,
    watch: NodeLabelWatch,
    tmp_path: Path,
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(13, sizes))
    foreign = {"team": "ml", label_key("someone-elses"): "ready", label_key("data") + "-x": "ready"}
    fake.delete_node("node-3")
    fake.add_node("node-3", labels=foreign)
    record.fault(f"node-3 carries labels datacache did not set: {sorted(foreign)}")
    chaos.start_coordinator(
        "--labeler=kubernetes", f"--kubeconfig={fake.write_kubeconfig(tmp_path / 'kc')}"
    )
    for node in NODES:
        chaos.start_agent(node)
    chaos.wait_registered(NODES)
    with Monitor(chaos, {"data": origin}) as monitor:
        for node in NODES:
            fake.inject_conflicts("nodes", name=node, count=2)
        record.fault("the next 2 writes to every Node answered 409 Conflict")
        chaos.create("data", origin.uri, replicas=2)
        wait_for(lambda: converged(chaos, fake, "data", 2), 60, "data Ready and labelled")
        retried = [
            r
            for r in _coordinator_log(chaos)
            if "Retrying label patch after 409" in r.get("msg", "")
        ]
        record.observe(f"{len(retried)} label patches retried after 409; labels set")
        holder = sorted(chaos.ready("data"))[0]
        uid_before = (fake.get_node(holder) or {})["metadata"]["uid"]
        fetched = chaos.agent_metric(
            holder, "datacache_agent_fetched_bytes_total", dataset="default/data"
        )

        fake.delete_node(holder)
        wait_for(
            lambda: any(
                "forgetting its replicas" in r.get("msg", "") for r in _coordinator_log(chaos)
            ),
            30,
            "the coordinator to see the deletion",
        )
        fake.add_node(holder)
        recreated = time.monotonic()
        record.fault(
            f"Node {holder} (a holder) deleted, then re-created under the same name (new UID)"
        )
        wait_for(
            lambda: (
                converged(chaos, fake, "data", 2)
                and (fake.get_node(holder) or {})["metadata"]["uid"] != uid_before
            ),
            90,
            "2 Ready, labelled replicas after the re-creation",
        )
        record.recovered(
            time.monotonic() - recreated,
            "from the Node's re-creation to 2 Ready replicas labelled on the current Node objects",
        )
        monitor.finish(record)
    refetched = (
        chaos.agent_metric(holder, "datacache_agent_fetched_bytes_total", dataset="default/data")
        - fetched
    )
    final = sorted(chaos.ready("data"))
    record.observe(
        f"after the re-creation: Ready and labelled on {final}; {holder} fetched "
        f"{refetched:.0f} bytes again"
    )
    labels3 = node_labels(fake, "node-3")
    record.observe(
        "foreign labels on node-3 at the end: "
        + ("all intact" if all(labels3.get(k) == v for k, v in foreign.items()) else str(labels3))
    )
    assert all(labels3.get(k) == v for k, v in foreign.items())
    owned3 = (fake.get_node("node-3") or {})["metadata"].get("annotations", {}).get(OWNED, "")
    assert not any(k in owned3.split(",") for k in foreign)
    assert len(retried) >= 1
    assert watch.error is None, watch.error
    assert record.exposed == 0 and record.lost == 0


def _coordinator_log(chaos: ChaosCluster) -> list[dict[str, Any]]:
    records = []
    for line in (chaos.local.workdir / "coordinator.log").read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
