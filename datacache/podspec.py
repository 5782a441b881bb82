"""Pod-spec fragments that put a pod where a dataset is and mount it read-only: pure functions.

Used by `datacache dataset affinity`, the placement query and the admission webhook, so all
three give the same answer. A dataset NAMESPACE/NAME is mounted at

    /datasets/<NAMESPACE>/<NAME>

from the node's `<cache dir>/datasets/<NAMESPACE>/<NAME>/current` (a hostPath volume, mounted
read-only). `current` is a symlink the agent switches atomically on refresh; a pod resolves it
when it starts, so a running pod keeps the version it started with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from datacache.validation import split_dataset_name

MOUNT_ROOT = "/datasets"
Affinity = Literal["required", "preferred"]
PREFERRED_WEIGHT = 100


def mount_path(dataset: str) -> str:
    namespace, name = split_dataset_name(dataset)
    return f"{MOUNT_ROOT}/{namespace}/{name}"


def node_path(cache_dir: str, dataset: str) -> str:
    namespace, name = split_dataset_name(dataset)
    return f"{cache_dir.rstrip('/')}/datasets/{namespace}/{name}/current"


def volume_name(dataset: str) -> str:
    """A DNS-1123 label (at most 63 characters), unique per dataset."""
    digest = hashlib.sha256(dataset.encode()).hexdigest()[:8]
    _, name = split_dataset_name(dataset)
    head = "".join(c if c.isalnum() else "-" for c in name)[:40].strip("-")
    return f"datacache-{head}-{digest}" if head else f"datacache-{digest}"


def selector_requirement(label_key: str, label_value: str) -> dict[str, Any]:
    return {"key": label_key, "operator": "In", "values": [label_value]}


@dataclass(frozen=True)
class DatasetMount:
    """What a pod needs to read one dataset."""

    dataset: str
    """Canonical "<namespace>/<name>"."""
    label_key: str
    label_value: str
    cache_dir: str
    """The agents' cache directory on the nodes."""
    affinity: Affinity = "required"

    @property
    def volume(self) -> dict[str, Any]:
        return {
            "name": volume_name(self.dataset),
            "hostPath": {"path": node_path(self.cache_dir, self.dataset), "type": "Directory"},
        }

    @property
    def volume_mount(self) -> dict[str, Any]:
        return {
            "name": volume_name(self.dataset),
            "mountPath": mount_path(self.dataset),
            "readOnly": True,
        }

    @property
    def node_affinity(self) -> dict[str, Any]:
        term = {"matchExpressions": [selector_requirement(self.label_key, self.label_value)]}
        if self.affinity == "preferred":
            return {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": PREFERRED_WEIGHT, "preference": term}
                ]
            }
        return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}

    def snippets(self) -> dict[str, Any]:
        """The three fragments a user pastes into a pod spec."""
        return {
            "affinity": {"nodeAffinity": self.node_affinity},
            "volumes": [self.volume],
            "volumeMounts": [self.volume_mount],
        }


def pod_patch(pod: dict[str, Any], mounts: list[DatasetMount]) -> list[dict[str, Any]]:
    """JSON Patch (RFC 6902) operations adding `mounts` to `pod`. Idempotent: a pod that
    already has a dataset's volume is not changed for that dataset (webhooks may be
    re-invoked). Required node affinity is ANDed into every existing nodeSelectorTerm
    (terms are ORed by the scheduler, so adding a separate term would weaken it)."""
    spec = pod.get("spec") or {}
    ops: list[dict[str, Any]] = []
    present = {v.get("name") for v in spec.get("volumes") or []}
    todo = [m for m in mounts if volume_name(m.dataset) not in present]
    if not todo:
        return ops

    if "volumes" not in spec:
        ops.append({"op": "add", "path": "/spec/volumes", "value": []})
    for mount in todo:
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": mount.volume})

    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            base = f"/spec/{kind}/{index}/volumeMounts"
            if "volumeMounts" not in container:
                ops.append({"op": "add", "path": base, "value": []})
            taken = {m.get("mountPath") for m in container.get("volumeMounts") or []}
            for mount in todo:
                if mount_path(mount.dataset) not in taken:
                    ops.append({"op": "add", "path": f"{base}/-", "value": mount.volume_mount})

    ops.extend(_affinity_ops(spec, todo))
    return ops


def _affinity_ops(spec: dict[str, Any], mounts: list[DatasetMount]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    affinity = spec.get("affinity")
    if affinity is None:
        ops.append({"op": "add", "path": "/spec/affinity", "value": {}})
        affinity = {}
    node_affinity = affinity.get("nodeAffinity")
    if node_affinity is None:
        ops.append({"op": "add", "path": "/spec/affinity/nodeAffinity", "value": {}})
        node_affinity = {}
    base = "/spec/affinity/nodeAffinity"

    required = [m for m in mounts if m.affinity == "required"]
    if required:
        requirements = [selector_requirement(m.label_key, m.label_value) for m in required]
        key = "requiredDuringSchedulingIgnoredDuringExecution"
        terms = (node_affinity.get(key) or {}).get("nodeSelectorTerms") or []
        if not terms:
            ops.append(
                {
                    "op": "add",
                    "path": f"{base}/{key}",
                    "value": {"nodeSelectorTerms": [{"matchExpressions": requirements}]},
                }
            )
        for index, term in enumerate(terms):
            path = f"{base}/{key}/nodeSelectorTerms/{index}/matchExpressions"
            if "matchExpressions" not in term:
                ops.append({"op": "add", "path": path, "value": []})
            for requirement in requirements:
                ops.append({"op": "add", "path": f"{path}/-", "value": requirement})

    preferred = [m for m in mounts if m.affinity == "preferred"]
    if preferred:
        key = "preferredDuringSchedulingIgnoredDuringExecution"
        if key not in node_affinity:
            ops.append({"op": "add", "path": f"{base}/{key}", "value": []})
        for mount in preferred:
            ops.append(
                {
                    "op": "add",
                    "path": f"{base}/{key}/-",
                    "value": {
                        "weight": PREFERRED_WEIGHT,
                        "preference": {
                            "matchExpressions": [
                                selector_requirement(mount.label_key, mount.label_value)
                            ]
                        },
                    },
                }
            )
    return ops
