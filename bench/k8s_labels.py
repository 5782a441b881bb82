"""What one reconcile pass pays to learn which nodes carry datacache labels, in a cluster.

    python bench/k8s_labels.py [--nodes 5000] [--labelled-every 10] [--calls 3] [--images 50]
                               [--workers 8]

It starts a real control plane of its own (etcd, kube-apiserver, kube-scheduler and
kube-controller-manager from `scripts/kube-binaries`, as the tests run them) in a temporary
directory and applies datacache's manifests with `kubectl apply --server-side -k manifests`, so
the coordinator's RBAC and the admission policies that fence its node permission are in force.
It registers NODES Node objects as kubelets would (labels, annotations, and a status with
capacity, conditions, addresses, node info and IMAGES container images; a kubelet reports at
most 50), a thread pool of WORKERS at a time. Every LABELLED_EVERY-th node then gets a datacache
label from `KubernetesNodeLabeler.set_labels`, with the coordinator ServiceAccount's token: the
admission policy lets no other identity set those labels.

With the same token (the coordinator's RBAC), it times `KubernetesNodeLabeler.labelled_nodes()`
(wall and this process's CPU) two ways: listing every Node (no Node watch), and reading the
coordinator's Node watch (`NodeDirectory`), after timing the watch's first list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# This script's directory holds bench/coordinator.py, which would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from coordinator.cluster import NodeDirectory  # noqa: E402
from coordinator.k8s_labeler import KubernetesNodeLabeler, core_api  # noqa: E402
from coordinator.k8s_nodes import NodeWatch  # noqa: E402
from coordinator.labels import label_key  # noqa: E402
from datacache.localcluster import wait_until  # noqa: E402
from tests.kubecontrolplane import KubeControlPlane  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COORDINATOR_SA = ("datacache", "datacache-coordinator")


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def kubelet_status(i: int, images: int) -> dict[str, Any]:
    """What a kubelet adds to the status `add_node` writes: the other conditions, addresses,
    endpoints, node info and the images it holds."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        for kind, reason, message in (
            ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
            ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        )
    ]
    return {
        "status": {
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"},
                {"type": "Hostname", "address": node_name(i)},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": f"{i:032x}",
                "systemUUID": f"{i:08x}-0000-4000-8000-000000000000",
                "bootID": f"{i:08x}-1111-4000-8000-000000000000",
                "kernelVersion": "6.8.0-1015-aws",
                "osImage": "Ubuntu 24.04.1 LTS",
                "containerRuntimeVersion": "containerd://1.7.22",
                "kubeletVersion": "v1.36.3",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": [
                {
                    "names": [
                        f"registry.example.com/ml/image-{j}@sha256:{j:064x}",
                        f"registry.example.com/ml/image-{j}:v1.{j}",
                    ],
                    "sizeBytes": 50_000_000 + j * 1_000_003,
                }
                for j in range(images)
            ],
        }
    }


def register(plane: KubeControlPlane, i: int, images: int) -> None:
    name = node_name(i)
    plane.add_node(
        name,
        labels={
            "team": "ml",
            "node.kubernetes.io/instance-type": "p5.48xlarge",
            "topology.kubernetes.io/region": "eu-west-1",
        },
        annotations={
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        },
        zone=f"eu-west-1{'abc'[i % 3]}",
        capacity={"nvidia.com/gpu": "8"},
    )
    plane.patch(f"/api/v1/nodes/{name}/status", kubelet_status(i, images), kind="strategic-merge")


def apply_manifests(plane: KubeControlPlane) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("kubectl is missing: pip install -e '.[dev]' installs it")
    subprocess.run(
        [
            kubectl,
            f"--kubeconfig={plane.admin_kubeconfig}",
            "--request-timeout=60s",
            "apply",
            "--server-side",
            "--field-manager=datacache-bench",
            "-k",
            str(REPO / "manifests"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    plane.wait_for_service_account(*COORDINATOR_SA)


def timed(labeler: KubernetesNodeLabeler, calls: int, expected: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(calls):
        wall, cpu = time.perf_counter(), time.process_time()
        found = asyncio.run(labeler.labelled_nodes())
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
        assert len(found) == expected, (len(found), expected)
    return out


async def label_all(writer: KubernetesNodeLabeler, nodes: list[str]) -> None:
    await asyncio.gather(*(writer.set_labels(n, {label_key("bench/a"): "ready"}) for n in nodes))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--labelled-every", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--images", type=int, default=50, help="container images per node")
    parser.add_argument("--workers", type=int, default=8, help="threads registering nodes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="datacache-bench-kube-") as work:
        plane = KubeControlPlane(Path(work) / "kube")
        with plane:
            apply_manifests(plane)
            plane.admin_ssl_context()  # made once, before the threads share it
            started = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                futures = [pool.submit(register, plane, i, args.images) for i in range(args.nodes)]
                for future in futures:
                    future.result()
            registered = time.perf_counter() - started
            token = plane.service_account_token(*COORDINATOR_SA)
            kubeconfig = plane.write_token_kubeconfig(Path(work) / "coordinator.kubeconfig", token)
            api = core_api(str(kubeconfig))
            labelled = [node_name(i) for i in range(0, args.nodes, args.labelled_every)]
            writer = KubernetesNodeLabeler(api)
            asyncio.run(label_all(writer, labelled))
            size = len(json.dumps(plane.get_node(node_name(args.nodes - 1))))
            listing = timed(writer, args.calls, len(labelled))
            directory = NodeDirectory()
            watch = NodeWatch(api, directory)
            wall, cpu = time.perf_counter(), time.process_time()
            watch.start()
            try:
                wait_until(lambda: directory.synced, 300, "the Node watch's first list")
                first_list = (time.perf_counter() - wall, time.process_time() - cpu)
                watched = timed(KubernetesNodeLabeler(api, directory), args.calls, len(labelled))
            finally:
                watch.stop()
    print(
        f"{args.nodes} nodes ({size:,} bytes of JSON each, {args.images} images), "
        f"{len(labelled)} labelled; registered in {registered:.0f} s with {args.workers} threads"
    )
    print(f"labelled_nodes(), {args.calls} calls, as the coordinator's ServiceAccount:")
    for name, runs in (("listing every Node", listing), ("from the Node watch", watched)):
        cells = ", ".join(f"{w * 1000:.1f} ms wall / {c * 1000:.1f} ms CPU" for w, c in runs)
        print(f"  {name:20s} {cells}")
    print(
        f"  the Node watch's first list: {first_list[0] * 1000:.0f} ms wall / "
        f"{first_list[1] * 1000:.0f} ms CPU (includes the watch thread's start)"
    )


if __name__ == "__main__":
    main()
