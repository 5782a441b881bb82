"""Scenarios 6 and 8, with labels on Node objects of a real Kubernetes control plane (etcd,
kube-apiserver, scheduler, controller manager; datacache's manifests applied): the coordinator
SIGKILLed and restarted during placement and during a label patch; a Node deleted and re-created
under the same name, foreign labels, 409 Conflicts on label patches.

The coordinator runs with its own ServiceAccount's token, as in a cluster, so every label it
writes passes RBAC and the admission policies that fence its node permission; it reaches the
API server through a fault proxy that records every request. The tests read Nodes and watch
their labels as the cluster admin, straight from the API server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
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
from tests.faultproxy import Fault, FaultProxy, Request, Rule
from tests.kubecontrolplane import KubeAPIError, KubeTest

NODES = ["node-1", "node-2", "node-3"]
OWNED = "datacache.io/owned-labels"
COORDINATOR_SA = ("datacache", "datacache-coordinator")
REFUSED = (401, 403, 422)
"""Statuses of a request the API server refused: authentication, RBAC or admission."""


def get_node(kube: KubeTest, node: str) -> dict[str, Any] | None:
    try:
        return kube.get_node(node)
    except KubeAPIError as exc:
        if exc.status == 404:
            return None
        raise


def node_labels(kube: KubeTest, node: str) -> dict[str, str]:
    obj = get_node(kube, node)
    return {} if obj is None else dict(obj["metadata"].get("labels") or {})


def owned_annotation(kube: KubeTest, node: str) -> set[str]:
    obj = get_node(kube, node)
    annotations = {} if obj is None else obj["metadata"].get("annotations") or {}
    return set(filter(None, annotations.get(OWNED, "").split(",")))


def labelled(kube: KubeTest, short: str) -> set[str]:
    return {n for n in NODES if node_labels(kube, n).get(label_key(short)) == "ready"}


def converged(chaos: ChaosCluster, kube: KubeTest, short: str, count: int) -> bool:
    ready = chaos.ready(short)
    return len(ready) == count and labelled(kube, short) == ready


def coordinator_flags(kube: KubeTest) -> tuple[str, ...]:
    """The coordinator as in a cluster: the Kubernetes labeler with its ServiceAccount's token,
    here through the fault proxy."""
    token = kube.token(*COORDINATOR_SA)
    return (
        "--labeler=kubernetes",
        f"--kubeconfig={kube.proxied_kubeconfig(token, name='coordinator')}",
    )


def node_path(request: Request) -> str | None:
    """The Node a request addresses (`/api/v1/nodes/<name>`, no subresource), if any."""
    path = request.path.partition("?")[0]
    prefix = "/api/v1/nodes/"
    if not path.startswith(prefix) or "/" in path[len(prefix) :]:
        return None
    return path[len(prefix) :]


def refused_requests(proxy: FaultProxy) -> list[tuple[str, str, int]]:
    statuses = proxy.statuses()
    return [
        (r.method, r.path, statuses[r.number])
        for r in proxy.requests
        if statuses.get(r.number) in REFUSED
    ]


@pytest.fixture
def kube_nodes(kube: KubeTest) -> KubeTest:
    """The control plane with NODES registered (Ready, with status), as kubelets would."""
    for node in NODES:
        kube.add_node(node)
    return kube


@pytest.fixture
def watch(kube_nodes: KubeTest) -> Iterator[NodeLabelWatch]:
    plane = kube_nodes.plane
    found = NodeLabelWatch(plane.server, plane.admin_ssl_context()).start()
    try:
        yield found
    finally:
        found.stop()


# `kube_nodes` comes first in each test's arguments: its cleanup (deleting the Nodes) then
# runs after the coordinator and agents of `chaos` have stopped.


@pytest.mark.scenario(6, "Coordinator SIGKILLed during placement and during label patching")
def test_coordinator_killed_during_placement_and_labelling(
    kube_nodes: KubeTest,
    watch: NodeLabelWatch,
    chaos: ChaosCluster,
    bucket: str,
    sizes: Sizes,
    record: ScenarioRecord,
) -> None:
    kube = kube_nodes
    origins = {
        short: S3Origin(chaos.local.s3_endpoint, bucket, prefix=f"{short}/")
        for short in ("a", "b", "c")
    }
    for i, origin in enumerate(origins.values()):
        origin.put_all(generate(10 + i, sizes))
    kube_proxy = kube.proxy
    with FaultProxy(chaos.local.s3_endpoint) as s3_proxy:
        flags = coordinator_flags(kube)
        chaos.start_coordinator(*flags)
        for node in NODES:
            chaos.start_agent(node, f"--s3-endpoint-url={s3_proxy.url}")
        chaos.wait_registered(NODES)
        with Monitor(chaos, origins) as monitor:
            chaos.create("a", origins["a"].uri, replicas=2)
            wait_for(lambda: converged(chaos, kube, "a", 2), 60, "a Ready and labelled")
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
            wait_for(lambda: converged(chaos, kube, "b", 2), 60, "b Ready and labelled")
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
            held_from = len(kube_proxy.requests)
            chaos.create("c", origins["c"].uri, replicas=1)
            wait_for(lambda: kube_proxy.counts()["latency"] >= 1, 60, "a label patch in flight")
            chaos.local.coordinator.kill()
            held = kube_proxy.injected[-1].request
            record.fault(
                "SIGKILL of the coordinator while its label PATCH was in flight (applied by the "
                "API server, the answer held back 5 s by a proxy)"
            )
            kube_proxy.set_rules([])
            restarted = time.monotonic()
            chaos.start_coordinator(*flags)
            wait_for(
                lambda: all(
                    converged(chaos, kube, s, n) for s, n in (("a", 2), ("b", 2), ("c", 1))
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
    # The held patch was a label write the API server applied (200) before the kill.
    statuses = kube_proxy.statuses()
    assert held.number > held_from and node_path(held) is not None, held
    assert statuses.get(held.number) == 200, (held, statuses.get(held.number))
    assert refused_requests(kube_proxy) == []
    node_patches = [
        statuses.get(r.number)
        for r in kube_proxy.requests
        if r.method == "PATCH" and node_path(r) is not None
    ]
    assert node_patches and set(node_patches) <= {200, None}, node_patches
    assert watch.error is None, watch.error
    assert removals == [], removals
    assert chaos.ready("a") == holders_a
    assert extra_reads == 0 and sum(refetched_a.values()) == 0
    for node in NODES:
        assert owned_annotation(kube, node) == {
            k for k in node_labels(kube, node) if k.startswith("dataset.")
        }
    assert record.exposed == 0 and record.lost == 0


CONFLICTS_PER_NODE = 2


@pytest.mark.scenario(8, "Node deleted and re-created, foreign labels, 409 on label patches")
def test_node_recreated_foreign_labels_and_conflicts(
    kube_nodes: KubeTest,
    watch: NodeLabelWatch,
    chaos: ChaosCluster,
    bucket: str,
    sizes: Sizes,
    record: ScenarioRecord,
) -> None:
    kube = kube_nodes
    plane = kube.plane
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(13, sizes))
    # Labels under datacache's prefix that are not in the owned-labels annotation: only the
    # coordinator's identity may set such labels (the admission policy), so they are seeded
    # with its token, as an older coordinator or a person holding its token would have.
    ours_elsewhere = {label_key("someone-elses"): "ready", label_key("data") + "-x": "ready"}
    foreign = {"team": "ml", **ours_elsewhere}
    coordinator_token = kube.token(*COORDINATOR_SA)
    plane.patch("/api/v1/nodes/node-3", {"metadata": {"labels": {"team": "ml"}}})
    plane.request(
        "PATCH",
        "/api/v1/nodes/node-3",
        {"metadata": {"labels": ours_elsewhere}},
        content_type="application/merge-patch+json",
        token=coordinator_token,
    )
    assert all(node_labels(kube, "node-3").get(k) == v for k, v in foreign.items())
    record.fault(f"node-3 carries labels datacache did not set: {sorted(foreign)}")

    # Another writer (as a kubelet or a controller would) changes each Node between the
    # coordinator's read and its label patch, the first CONFLICTS_PER_NODE times: the patch
    # carries the resourceVersion read, so the API server itself answers 409 Conflict. The
    # proxy picks its rules before it forwards a request, so the other write lands first every
    # time (straight to the API server, not through the proxy).
    raced: dict[str, int] = {}

    def race(request: Request) -> Fault | None:
        node = node_path(request)
        if request.method != "PATCH" or node not in NODES:
            return None
        if raced.get(node, 0) >= CONFLICTS_PER_NODE:
            return None
        raced[node] = raced.get(node, 0) + 1
        plane.patch(
            f"/api/v1/nodes/{node}",
            {"metadata": {"annotations": {"chaos.datacache.io/other-writer": str(raced[node])}}},
        )
        return None

    chaos.start_coordinator(*coordinator_flags(kube))
    for node in NODES:
        chaos.start_agent(node)
    chaos.wait_registered(NODES)
    with Monitor(chaos, {"data": origin}) as monitor:
        kube.proxy.set_rules(race)
        record.fault(
            f"the first {CONFLICTS_PER_NODE} label patches of every Node raced with another "
            "writer's change to it: 409 Conflict from the API server (stale resourceVersion)"
        )
        chaos.create("data", origin.uri, replicas=2)
        wait_for(lambda: converged(chaos, kube, "data", 2), 60, "data Ready and labelled")
        retried = _retries_after_conflict(chaos)
        conflicts = _conflicts(kube.proxy)
        record.observe(
            f"{len(retried)} label patches retried after 409 ({len(conflicts)} answered 409 by "
            "the API server); labels set"
        )
        holder = sorted(chaos.ready("data"))[0]
        uid_before = kube.get_node(holder)["metadata"]["uid"]
        fetched = chaos.agent_metric(
            holder, "datacache_agent_fetched_bytes_total", dataset="default/data"
        )

        kube.delete_node(holder)
        wait_for(
            lambda: any(
                "forgetting its replicas" in r.get("msg", "") for r in _coordinator_log(chaos)
            ),
            30,
            "the coordinator to see the deletion",
        )
        kube.add_node(holder)
        recreated = time.monotonic()
        record.fault(
            f"Node {holder} (a holder) deleted, then re-created under the same name (new UID)"
        )

        def current_uid() -> str | None:
            obj = get_node(kube, holder)
            return None if obj is None else str(obj["metadata"]["uid"])

        wait_for(
            lambda: converged(chaos, kube, "data", 2) and current_uid() not in (None, uid_before),
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
    labels3 = node_labels(kube, "node-3")
    record.observe(
        "foreign labels on node-3 at the end: "
        + ("all intact" if all(labels3.get(k) == v for k, v in foreign.items()) else str(labels3))
    )
    assert all(labels3.get(k) == v for k, v in foreign.items())
    assert not owned_annotation(kube, "node-3") & set(foreign)
    # The two holders' patches met their races before the labels were set; over the whole
    # scenario, every 409 was one a race caused, and each was retried.
    assert len(retried) >= 2 * CONFLICTS_PER_NODE, retried
    assert len(_conflicts(kube.proxy)) == sum(raced.values()), (_conflicts(kube.proxy), raced)
    assert len(_retries_after_conflict(chaos)) == sum(raced.values())
    # The Node seen by the watch under both UIDs: the deletion and the re-creation.
    assert len(watch.uids[holder]) == 2, watch.uids
    assert refused_requests(kube.proxy) == []
    assert watch.error is None, watch.error
    assert record.exposed == 0 and record.lost == 0


def _conflicts(proxy: FaultProxy) -> list[Request]:
    """The label patches the API server answered 409 Conflict."""
    statuses = proxy.statuses()
    return [
        r
        for r in proxy.requests
        if r.method == "PATCH" and node_path(r) is not None and statuses.get(r.number) == 409
    ]


def _retries_after_conflict(chaos: ChaosCluster) -> list[dict[str, Any]]:
    return [
        r for r in _coordinator_log(chaos) if "Retrying label patch after 409" in r.get("msg", "")
    ]


def _coordinator_log(chaos: ChaosCluster) -> list[dict[str, Any]]:
    records = []
    for line in (chaos.local.workdir / "coordinator.log").read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
