"""Scenario 2: bytes flipped in transit, from S3, from NFS and from a peer agent.

Each transport gets one test that sets up its flipping path and calls `flip_scenario`, which
creates the dataset, arms the flips, waits for every replica to be Ready, and checks that the
flips were injected, detected (checksum failures on the agents), repaired by reading again,
and never exposed. The peer test puts the HTTP `FaultProxy` in front of the first replica's
peer server (the agent advertises the proxy's address), so the later replicas read that
version from it through flipped answers; it also checks that the flipping peer was blamed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlencode

import pytest

from agent.errors import SourceError
from agent.peerserver import FILE_PATH, FILES_PATH
from agent.sources import nfs as nfs_module
from datacache.localcluster import free_port
from tests.chaos.flipproxy import FlipProxy
from tests.chaos.harness import (
    BIG_KEY,
    ChaosCluster,
    DirOrigin,
    Monitor,
    Origin,
    S3Origin,
    Sizes,
    generate,
    wait_for,
)
from tests.chaos.report import ScenarioRecord
from tests.faultproxy import Fault, FaultProxy, Request, Rule
from tests.nfsserver import NfsServer, unavailable_reason


def flip_scenario(
    chaos: ChaosCluster,
    record: ScenarioRecord,
    origin: Origin,
    nodes: list[str],
    arm: Callable[[], None],
    injected: Callable[[], int],
    clean_first: bool,
) -> None:
    """Runs a dataset of `origin` onto `nodes` (agents started by the caller) with flips armed
    by `arm`; `injected` counts the flips applied. With `clean_first` the first replica is
    copied before the flips are armed (it fixes the version the later ones are checked
    against), otherwise every replica copies through them."""
    with Monitor(chaos, {"data": origin}) as monitor:
        started = time.monotonic()
        if clean_first:
            chaos.create("data", origin.uri, replicas=1)
            chaos.wait_ready("data", 1)
            arm()
            started = time.monotonic()
            chaos.update_replicas("data", len(nodes))
        else:
            arm()
            chaos.create("data", origin.uri, replicas=len(nodes))
        chaos.wait_ready("data", len(nodes), timeout=120)
        record.recovered(
            time.monotonic() - started,
            f"from arming the flips to {len(nodes)} Ready replicas"
            + (" (after the first, clean one)" if clean_first else ""),
        )
        monitor.finish(record)
    failures = sum(chaos.agent_metric(n, "datacache_agent_checksum_failures_total") for n in nodes)
    retried = sum(
        chaos.agent_metric(n, "datacache_agent_fetch_retries_total", reason="checksum")
        for n in nodes
    )
    flips = injected()
    record.observe(
        f"{flips} flips injected; agents counted {failures:.0f} checksum failures and "
        f"{retried:.0f} reads retried for a checksum; every replica Ready and verified"
    )
    dataset = chaos.dataset("data")
    assert dataset is not None
    methods = {m for r in dataset.status.replicas for m in r.verification.files_by_method}
    record.observe(f"verification methods recorded: {sorted(methods)}")
    assert flips > 0
    # A flip in a read abandoned when another file failed the copy is never checked.
    assert failures >= 1
    assert monitor.complete_copies("data") == set(nodes)
    assert len({r.digest for r in dataset.status.replicas}) == 1
    assert record.exposed == 0 and record.lost == 0


@pytest.mark.scenario(2, "Flipped bytes in transit from S3")
def test_flipped_bytes_from_s3(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(generate(4, sizes))
    nodes = ["node-1", "node-2"]

    def big_range(request: Request) -> bool:
        return request.range is not None and f"/ds/{BIG_KEY}" in request.path

    rules = [
        # Whole-object GETs carry the stored CRC: the file is read again at once.
        Rule(Fault("flip", offset=0), method="GET", path_contains="/ds/small/d0/", limit=2),
        Rule(
            Fault("flip", offset=100, xor=0x01),
            method="GET",
            path_contains="/ds/small/d5/",
            limit=2,
        ),
        # Ranges carry none: the whole-file CRC catches it and the copy is read again.
        Rule(Fault("flip", offset=54_321), method="GET", when=big_range, limit=1),
    ]
    with FaultProxy(chaos.local.s3_endpoint) as proxy:
        chaos.start_coordinator()
        for node in nodes:
            chaos.start_agent(node, f"--s3-endpoint-url={proxy.url}")
        chaos.wait_registered(nodes)
        flip_scenario(
            chaos,
            record,
            origin,
            nodes,
            arm=lambda: proxy.set_rules(rules),
            injected=lambda: proxy.counts()["flip"],
            clean_first=False,
        )
        record.fault(
            f"{proxy.counts()['flip']} bytes flipped by the fault proxy: in 4 whole-object GETs "
            f"of small files and in one 1 MiB range of {BIG_KEY}"
        )


def peer_flags(chaos: ChaosCluster, node: str, advertise: str | None = None) -> list[str]:
    """Flags turning peer copying on for `node`: the cluster's key file and a loopback peer
    server, advertised as `advertise` (host:port other agents dial) or as itself."""
    port = chaos.local.agent_peer_ports.setdefault(node, free_port())
    return [
        f"--peer-key-file={chaos.local.peer_key_file}",
        f"--peer-port={port}",
        "--peer-listen-address=127.0.0.1",
        f"--peer-advertise-address={advertise or f'127.0.0.1:{port}'}",
    ]


def parse_path(request: Request) -> str:
    """What a peer read asked for: the dataset path of a file read, or a batch's first file."""
    if request.path.startswith(f"{FILES_PATH}?"):
        return "the first file of a batch of small files"
    query = request.path.partition("?")[2]
    return parse_qs(query).get("path", ["?"])[0]


def is_peer_read(request: Request) -> bool:
    """A file (or range) read, GET /v1/file, or a batch of small files, POST /v1/files."""
    return (request.method, request.path.partition("?")[0]) in (
        ("GET", FILE_PATH),
        ("POST", FILES_PATH),
    )


@pytest.mark.scenario(2, "Flipped bytes in transit from a peer agent")
def test_flipped_bytes_from_a_peer(
    chaos: ChaosCluster, bucket: str, sizes: Sizes, record: ScenarioRecord
) -> None:
    files = generate(6, sizes)
    origin = S3Origin(chaos.local.s3_endpoint, bucket)
    origin.put_all(files)
    nodes = ["node-1", "node-2", "node-3"]

    def peer_read(key: str) -> Callable[[Request], bool]:
        # Peer reads are GET /v1/file?dataset=...&version=...&path=<key>, always ranged.
        query = urlencode({"path": key})
        return lambda r: r.path.startswith(f"{FILE_PATH}?") and r.path.endswith(query)

    def batch_read(r: Request) -> bool:
        # Small files are read in batches: POST /v1/files?dataset=...&version=..., their paths
        # in the body, their bytes back to back in the answer.
        return r.path.startswith(f"{FILES_PATH}?")

    rules = [
        # The first byte of a batch is its first file's: that file fails the manifest check, is
        # blamed on its sender and read again from S3, as are the batch's files after it.
        Rule(Fault("flip", offset=0), method="POST", when=batch_read, limit=1),
        # One range of the big file: the whole file fails, every range is read again from S3
        # and the sender of the range that differs is blamed.
        Rule(
            Fault("flip", offset=54_321, xor=0x01), method="GET", when=peer_read(BIG_KEY), limit=1
        ),
    ]
    # node-1 copies the first, clean replica from S3 alone (the coordinator may place it on any
    # agent, so the others start only then). It advertises the proxy in front of its peer
    # server, so node-2 and node-3 read the version from node-1 through it (and serve each
    # other directly).
    node1_port = chaos.local.agent_peer_ports.setdefault("node-1", free_port())
    with FaultProxy(f"http://127.0.0.1:{node1_port}") as proxy:
        chaos.start_coordinator()
        chaos.start_agent("node-1", *peer_flags(chaos, "node-1", f"127.0.0.1:{proxy.port}"))
        chaos.wait_registered(["node-1"])

        def arm() -> None:
            assert chaos.ready("data") == {"node-1"}
            # Later replicas copy from peers only once the first copy fixed the version.
            wait_for(
                lambda: bool((d := chaos.dataset("data")) and d.status.version),
                20,
                "the first copy to fix the version",
            )
            for node in nodes[1:]:
                chaos.start_agent(node, *peer_flags(chaos, node))
            chaos.wait_registered(nodes)
            proxy.set_rules(rules)

        flip_scenario(
            chaos,
            record,
            origin,
            nodes,
            arm=arm,
            injected=lambda: proxy.counts()["flip"],
            clean_first=True,
        )
        injected = proxy.injected
        requests = proxy.requests
    receivers = nodes[1:]
    corrupt = {
        n: chaos.agent_metric(n, "datacache_agent_peer_fallbacks_total", reason="corrupt")
        for n in nodes
    }
    received = {
        n: chaos.agent_metric(n, "datacache_agent_peer_received_bytes_total") for n in nodes
    }
    served = chaos.agent_metric("node-1", "datacache_agent_peer_served_bytes_total")
    blamed = {
        (n, str(line.get("peer")))
        for n in receivers
        for line in chaos.agent_log(n)
        if "(corrupt)" in str(line.get("msg", "")) and "Avoiding peer" in str(line.get("msg", ""))
    }
    flipped = sorted({parse_path(i.request) for i in injected})
    batches = sum(1 for r in requests if r.method == "POST")
    record.fault(
        f"{len(injected)} bytes flipped by the fault proxy in front of node-1's peer server, "
        f"in its answers to node-2 and node-3 (of {len(requests)} peer reads through it, "
        f"{batches} of them batches of small files): "
        f"in {', '.join(flipped)}"
    )
    record.observe(
        "peers left as corrupt: "
        + ", ".join(f"{n} {corrupt[n]:.0f}" for n in receivers)
        + "; bytes read from peers: "
        + ", ".join(f"{n} {received[n]:.0f}" for n in receivers)
        + f"; node-1 served {served:.0f}; blamed as corrupt (receiver, peer): {sorted(blamed)}"
    )
    # Every flip was in a peer read, and the receivers did read from node-1 through the proxy.
    assert injected and all(is_peer_read(i.request) for i in injected)
    assert all(is_peer_read(r) for r in requests) and batches >= 1
    assert served > 0 and sum(received[n] for n in receivers) > 0
    # The receivers left node-1 (the only peer whose answers were flipped) as corrupt, and
    # blamed no other peer; node-1 copied from S3 and blamed nobody.
    assert sum(corrupt[n] for n in receivers) >= 1
    assert blamed and {peer for _, peer in blamed} == {"node-1"}
    assert corrupt["node-1"] == 0


@pytest.fixture(scope="module")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"NFS test server: {reason}")
    try:
        nfs_module.libnfs()
    except SourceError as exc:
        pytest.skip(str(exc))
    with NfsServer(tmp_path_factory.mktemp("nfs")) as server:
        yield server


@pytest.mark.scenario(2, "Flipped bytes in transit from NFS (NFSv4 through a flipping TCP proxy)")
def test_flipped_bytes_from_nfs(
    chaos: ChaosCluster, nfs_server: NfsServer, sizes: Sizes, record: ScenarioRecord
) -> None:
    files = generate(5, sizes)
    big = files[BIG_KEY]
    small = sorted(k for k in files if k != BIG_KEY and len(files[k]) >= 4096)[0]
    offset = min(2 * sizes.part_bytes + 777, len(big) - 64)
    patterns = [big[offset : offset + 32], files[small][1000:1032]]
    with FlipProxy((nfs_server.address, 2049), patterns) as proxy:
        origin = DirOrigin(
            nfs_server.export_dir / "flips",
            f"nfs://127.0.0.1:{proxy.port}/export/flips/",
        )
        origin.put_all(files)
        nodes = ["node-1", "node-2"]
        chaos.start_coordinator()
        for node in nodes:
            chaos.start_agent(node, "--nfs-version=4")
        chaos.wait_registered(nodes)
        flip_scenario(
            chaos,
            record,
            origin,
            nodes,
            arm=proxy.arm,
            injected=lambda: len(proxy.flipped),
            clean_first=True,
        )
        record.fault(
            f"{len(proxy.flipped)} bytes flipped in NFS READ replies (NFSv4 over TCP) to the "
            f"second replica: in {BIG_KEY} at offset {offset} and in {small}"
        )
