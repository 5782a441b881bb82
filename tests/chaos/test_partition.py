"""Scenario 7: a network partition between one agent and the coordinator.

The agent runs in its own network namespace, joined to the host by a veth pair on a private
/30 of 198.19.0.0/16 (RFC 2544 benchmarking space, clashing with no real network); it reaches
the coordinator on the host's end of the link. The partition is nftables rules inside the
agent's namespace dropping every packet to and from the coordinator's port, so nothing outside
the namespace is touched. The dataset is read from a file:// directory (the same file system
for every agent), so the partition cuts the agent off from the coordinator only."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosCluster, DirOrigin, Monitor, Sizes, generate, wait_for
from tests.chaos.report import ScenarioRecord

ZONE = "topology.kubernetes.io/zone"


def _run(*argv: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


@dataclass
class Namespace:
    name: str
    host_ip: str
    inner_ip: str
    host_link: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def partition(self, port: int) -> None:
        rules = f"""
table inet chaos {{
  chain out {{ type filter hook output priority 0; policy accept;
    ip daddr {self.host_ip} tcp dport {port} drop; }}
  chain in {{ type filter hook input priority 0; policy accept;
    ip saddr {self.host_ip} tcp sport {port} drop; }}
}}
"""
        _run("ip", "netns", "exec", self.name, "nft", "-f", "-", stdin=rules)

    def heal(self) -> None:
        _run("ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", "chaos")


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (Debian iproute2, nftables)")
    slot = os.getpid() % 250
    name, host_link, inner_link = f"dcchaos{slot}", f"dcc{slot}h", f"dcc{slot}n"
    host_ip, inner_ip = f"198.19.{slot}.1", f"198.19.{slot}.2"
    try:
        _run("ip", "netns", "add", name)
    except RuntimeError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        _run("ip", "link", "add", host_link, "type", "veth", "peer", "name", inner_link)
        _run("ip", "link", "set", inner_link, "netns", name)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_link)
        _run("ip", "link", "set", host_link, "up")
        _run("ip", "-n", name, "addr", "add", f"{inner_ip}/30", "dev", inner_link)
        _run("ip", "-n", name, "link", "set", inner_link, "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield Namespace(name, host_ip, inner_ip, host_link)
    finally:
        subprocess.run(
            ["ip", "link", "del", host_link], capture_output=True, timeout=30, check=False
        )
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


@pytest.mark.scenario(7, "Network partition between an agent and the coordinator (nftables)")
def test_partition_lease_expiry_and_healing(
    chaos: ChaosCluster,
    namespace: Namespace,
    sizes: Sizes,
    record: ScenarioRecord,
    tmp_path: Path,
) -> None:
    origin = DirOrigin(tmp_path / "source")
    origin.put_all(generate(14, sizes))
    # Listening on every address: the namespaced agent dials the host's end of the veth.
    chaos.local.coordinator_address = "0.0.0.0:0"
    chaos.start_coordinator("--lease-seconds=4")
    port = int(chaos.local.coordinator_address.rsplit(":", 1)[1])
    # Zones spread the two replicas: node-1 (zone a, partitioned) always holds one.
    chaos.start_agent(
        "node-1",
        f"--node-label={ZONE}=a",
        "--metrics-port=0",
        "--health-port=0",
        wrapper=namespace.exec_prefix(),
        coordinator=f"{namespace.host_ip}:{port}",
    )
    for node in ("node-2", "node-3"):
        chaos.start_agent(node, f"--node-label={ZONE}=b")
    nodes = ["node-1", "node-2", "node-3"]
    chaos.wait_registered(nodes)
    with Monitor(chaos, {"data": origin}) as monitor:
        chaos.create("data", origin.uri, replicas=2)
        chaos.wait_ready("data", 2)
        before = chaos.ready("data")
        assert "node-1" in before
        namespace.partition(port)
        cut = time.monotonic()
        record.fault(
            f"nftables in node-1's network namespace drops every packet to and from the "
            f"coordinator's port {port} (lease 4 s); node-1 holds a Ready replica"
        )
        others = set(nodes) - {"node-1"}
        wait_for(
            lambda: chaos.ready("data") == others and chaos.labelled("data") == others,
            60,
            "re-replication away from the partitioned node",
        )
        rereplicated = time.monotonic() - cut
        record.observe(
            f"node-1's lease expired; its label removed and the replica re-placed: Ready on "
            f"{sorted(others)} {rereplicated:.1f}s after the partition"
        )
        held = "node-1" in monitor.complete_copies("data")
        record.observe(f"node-1 kept its verified copy on disk while partitioned: {held}")
        namespace.heal()
        healed = time.monotonic()
        record.fault("partition healed (nftables table deleted)")
        wait_for(
            lambda: any(n.name == "node-1" and n.agent_connected for n in chaos.local.list_nodes()),
            90,
            "node-1 to reconnect",
        )
        chaos.wait_ready("data", 2)
        wait_for(
            lambda: (
                len(monitor.complete_copies("data")) == 2
                and chaos.ready("data") == monitor.complete_copies("data")
            ),
            60,
            "the extra copy to be removed",
        )
        record.recovered(
            time.monotonic() - healed,
            f"from healing to node-1 reconnected and 2 Ready, labelled replicas (the "
            f"re-replication itself took {rereplicated:.1f}s from the cut)",
        )
        monitor.finish(record)
    record.observe(
        f"after healing: Ready and labelled on {sorted(chaos.ready('data'))}; copies on disk "
        f"{sorted(monitor.complete_copies('data'))}"
    )
    assert held
    assert chaos.labelled("data") == chaos.ready("data")
    assert record.exposed == 0 and record.lost == 0
