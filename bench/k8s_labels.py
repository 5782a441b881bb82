"""What one reconcile pass pays to learn which nodes carry datacache labels, in a cluster.

    python bench/k8s_labels.py [--nodes 5000] [--labelled-every 10] [--calls 3]

Against the fake Kubernetes API server of the tests (the official client over HTTP), with
NODES Node objects of which every LABELLED_EVERY-th carries a datacache label, it times
`KubernetesNodeLabeler.labelled_nodes()` (wall and this process's CPU) two ways: listing every
Node (no Node watch), and reading the coordinator's Node watch (`NodeDirectory`). The fake's
Node objects are small (name, a few labels, no status); real ones are several times larger,
so the listing costs more in a real cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

# This script's directory holds bench/coordinator.py, which would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from coordinator.cluster import NodeDirectory  # noqa: E402
from coordinator.k8s_labeler import KubernetesNodeLabeler, core_api  # noqa: E402
from coordinator.k8s_nodes import NodeWatch  # noqa: E402
from coordinator.labels import label_key  # noqa: E402
from datacache.localcluster import wait_until  # noqa: E402
from tests.fakekube import FakeKubeAPI  # noqa: E402


def timed(labeler: KubernetesNodeLabeler, calls: int, expected: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(calls):
        wall, cpu = time.perf_counter(), time.process_time()
        found = asyncio.run(labeler.labelled_nodes())
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
        assert len(found) == expected, (len(found), expected)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--labelled-every", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    with FakeKubeAPI() as fake, tempfile.TemporaryDirectory() as work:
        api = core_api(str(fake.write_kubeconfig(Path(work) / "kubeconfig")))
        for i in range(args.nodes):
            fake.add_node(f"node-{i:05d}", labels={"team": "ml"}, zone=f"z{i % 3}")
        writer = KubernetesNodeLabeler(api)
        labelled = range(0, args.nodes, args.labelled_every)
        for i in labelled:
            asyncio.run(writer.set_labels(f"node-{i:05d}", {label_key("bench/a"): "ready"}))
        listing = timed(writer, args.calls, len(labelled))
        directory = NodeDirectory()
        watch = NodeWatch(api, directory)
        watch.start()
        try:
            wait_until(lambda: directory.synced, 120, "the Node watch's first list")
            watched = timed(KubernetesNodeLabeler(api, directory), args.calls, len(labelled))
        finally:
            watch.stop()
    print(f"{args.nodes} nodes, {len(labelled)} labelled; labelled_nodes(), {args.calls} calls:")
    for name, runs in (("listing every Node", listing), ("from the Node watch", watched)):
        cells = ", ".join(f"{w * 1000:.1f} ms wall / {c * 1000:.1f} ms CPU" for w, c in runs)
        print(f"  {name:20s} {cells}")


if __name__ == "__main__":
    main()
