"""The node label scheme and label diffing: pure functions, no I/O.

A node holding a Ready, verified replica of dataset NAMESPACE/NAME carries the label

    dataset.datacache.io/<NAMESPACE>.<NAME>: ready

Namespaces contain no dots, so the first dot separates the two. The name part of a label key
is at most 63 characters; longer ones are cut to 54
characters and given a '-' and 8 hex digits of the SHA-256 of the full name, so keys stay
unique and deterministic. Every key under `dataset.datacache.io/` belongs to datacache, and
the annotation `datacache.io/owned-labels` lists the keys datacache set on a node, so removal
only ever touches those (a user's labels are never removed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Set
from typing import Any

from datacache.validation import split_dataset_name

LABEL_PREFIX = "dataset.datacache.io"
OWNED_LABELS_ANNOTATION = "datacache.io/owned-labels"
READY_VALUE = "ready"
_MAX_NAME_PART = 63
_HASH_DIGITS = 8


def label_key(dataset: str) -> str:
    """The node label key for a canonical dataset name ("<namespace>/<name>")."""
    namespace, short = split_dataset_name(dataset)
    flat = f"{namespace}.{short}"
    if len(flat) <= _MAX_NAME_PART:
        return f"{LABEL_PREFIX}/{flat}"
    digest = hashlib.sha256(flat.encode()).hexdigest()[:_HASH_DIGITS]
    head = flat[: _MAX_NAME_PART - _HASH_DIGITS - 1].rstrip("-.")
    return f"{LABEL_PREFIX}/{head}-{digest}"


def parse_owned(annotation: str | None) -> frozenset[str]:
    if not annotation:
        return frozenset()
    return frozenset(k for k in annotation.split(",") if k)


def format_owned(keys: Set[str]) -> str:
    return ",".join(sorted(keys))


def desired_node_labels(ready: Mapping[str, frozenset[str]]) -> dict[str, dict[str, str]]:
    """Labels each node should carry, from the nodes holding Ready replicas of each dataset."""
    out: dict[str, dict[str, str]] = {}
    for dataset, nodes in ready.items():
        for node in nodes:
            out.setdefault(node, {})[label_key(dataset)] = READY_VALUE
    return out


def label_patch(
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    desired: Mapping[str, str],
) -> dict[str, Any] | None:
    """The JSON merge patch that makes a node's datacache labels equal `desired`.

    Returns None when nothing needs to change. Only keys that are desired or recorded as ours
    are touched; the owned-labels annotation is rewritten to the desired key set.
    """
    owned = parse_owned(annotations.get(OWNED_LABELS_ANNOTATION))
    changes: dict[str, str | None] = {}
    for key, value in desired.items():
        if labels.get(key) != value:
            changes[key] = value
    for key in owned - desired.keys():
        if key in labels:
            changes[key] = None
    new_owned = format_owned(desired.keys())
    annotation_change = (annotations.get(OWNED_LABELS_ANNOTATION) or "") != new_owned
    if not changes and not annotation_change:
        return None
    metadata: dict[str, Any] = {}
    if changes:
        metadata["labels"] = changes
    if annotation_change:
        metadata["annotations"] = {OWNED_LABELS_ANNOTATION: new_owned or None}
    return {"metadata": metadata}


def owned_labels(labels: Mapping[str, str], annotations: Mapping[str, str]) -> dict[str, str]:
    """The labels on a node that datacache set."""
    owned = parse_owned(annotations.get(OWNED_LABELS_ANNOTATION))
    return {k: v for k, v in labels.items() if k in owned}
