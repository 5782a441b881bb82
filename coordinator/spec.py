"""Validation of dataset specs from the API: node selectors and tolerations by the Kubernetes
rules, credentials Secret names, update masks. Pure; errors are `InvalidArgument` naming the
field, the bad value and what to write instead."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from coordinator.errors import InvalidArgument
from coordinator.model import DatasetRecord, DatasetSpec, Toleration
from datacache.v1 import datacache_pb2 as pb
from datacache.validation import InvalidInput, parse_source, validate_replicas

MAX_SELECTOR_ENTRIES = 64
MAX_TOLERATIONS = 64
UPDATABLE_PATHS = (
    "replicas",
    "all_nodes",
    "node_selector",
    "tolerations",
    "pin",
    "credentials_secret",
    "source",
    "max_replicas",
)
MAX_MAX_REPLICAS = 10_000
OPERATORS = ("Equal", "Exists")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def validate_label_key(key: str, where: str) -> str:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise InvalidArgument(
            f"{where}: label key {key[:100]!r} has an invalid prefix: it must be a DNS subdomain "
            "of at most 253 characters (e.g. 'example.com/gpu')"
        )
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"{where}: label key {key[:100]!r} is not valid: the name part must be 1-63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    return key


def validate_label_value(value: str, where: str) -> str:
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        raise InvalidArgument(
            f"{where}: label value {value[:100]!r} is not valid: use at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit (or empty)"
        )
    return value


def validate_labels(labels: Mapping[str, str], where: str) -> dict[str, str]:
    if len(labels) > MAX_SELECTOR_ENTRIES:
        raise InvalidArgument(
            f"{where} has {len(labels)} entries; at most {MAX_SELECTOR_ENTRIES} are allowed"
        )
    return {
        validate_label_key(k, where): validate_label_value(v, f"{where}[{k}]")
        for k, v in sorted(labels.items())
    }


def validate_tolerations(items: Iterable[pb.Toleration]) -> tuple[Toleration, ...]:
    out = []
    for i, t in enumerate(items):
        where = f"tolerations[{i}]"
        if i >= MAX_TOLERATIONS:
            raise InvalidArgument(f"at most {MAX_TOLERATIONS} tolerations are allowed")
        operator = t.operator or "Equal"
        if operator not in OPERATORS:
            raise InvalidArgument(
                f"{where}: operator {t.operator!r} is not valid: use 'Equal' or 'Exists'"
            )
        if t.effect and t.effect not in EFFECTS:
            raise InvalidArgument(
                f"{where}: effect {t.effect!r} is not valid: use 'NoSchedule', "
                "'PreferNoSchedule', 'NoExecute' or leave it empty for every effect"
            )
        if t.key:
            validate_label_key(t.key, where)
        elif operator != "Exists":
            raise InvalidArgument(
                f"{where}: an empty key tolerates every taint only with operator 'Exists'"
            )
        if operator == "Exists" and t.value:
            raise InvalidArgument(f"{where}: operator 'Exists' takes no value; remove it")
        validate_label_value(t.value, where)
        out.append(Toleration(t.key, operator, t.value, t.effect))
    return tuple(out)


def validate_secret_name(name: str) -> str:
    if name and (len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name)):
        raise InvalidArgument(
            f"credentials_secret {name[:100]!r} is not a Secret name: use a DNS subdomain "
            "(lowercase letters, digits, '-' and '.', at most 253 characters)"
        )
    return name


def _replicas(dataset: pb.Dataset) -> int:
    if dataset.all_nodes and dataset.replicas == 0:
        return 0  # ignored with all_nodes
    try:
        return validate_replicas(dataset.replicas)
    except InvalidInput as exc:
        raise InvalidArgument(f"{exc} (or set all_nodes for a copy on every node)") from exc


def validate_max_replicas(max_replicas: int, replicas: int, all_nodes: bool) -> int:
    if max_replicas == 0:
        return 0
    if all_nodes:
        raise InvalidArgument(
            f"max_replicas {max_replicas} has no effect with all_nodes (a copy is on every "
            "node already); set it to 0"
        )
    if not replicas <= max_replicas <= MAX_MAX_REPLICAS:
        raise InvalidArgument(
            f"max_replicas must be 0 (no demand scaling) or {replicas}-{MAX_MAX_REPLICAS} "
            f"(at least replicas, {replicas}), got {max_replicas}"
        )
    return max_replicas


def spec_from_create(dataset: pb.Dataset) -> DatasetSpec:
    replicas = _replicas(dataset)
    return DatasetSpec(
        source=parse_source(dataset.source).uri,
        replicas=replicas,
        all_nodes=dataset.all_nodes,
        node_selector=validate_labels(dataset.node_selector, "node_selector"),
        tolerations=validate_tolerations(dataset.tolerations),
        pin=dataset.pin,
        credentials_secret=validate_secret_name(dataset.credentials_secret),
        max_replicas=validate_max_replicas(dataset.max_replicas, replicas, dataset.all_nodes),
    )


def spec_from_update(
    record: DatasetRecord, dataset: pb.Dataset, paths: Iterable[str]
) -> tuple[DatasetSpec, bool]:
    """The new spec after an update of `paths`, and whether it starts a new revision (the
    source changed)."""
    wanted = list(paths)
    if not wanted:
        raise InvalidArgument(
            f"update_mask is empty: name the fields to change, some of {list(UPDATABLE_PATHS)}"
        )
    for path in wanted:
        if path not in UPDATABLE_PATHS:
            raise InvalidArgument(
                f"update_mask path {path!r} cannot be changed; changeable: {list(UPDATABLE_PATHS)}"
            )
    paths_set = set(wanted)
    all_nodes = dataset.all_nodes if "all_nodes" in paths_set else record.all_nodes
    replicas = record.replicas
    if "replicas" in paths_set:
        probe = pb.Dataset(replicas=dataset.replicas, all_nodes=all_nodes)
        replicas = _replicas(probe)
    elif not all_nodes and replicas == 0:
        raise InvalidArgument("turning all_nodes off needs a replica count: add 'replicas'")
    source = parse_source(dataset.source).uri if "source" in paths_set else record.source
    spec = DatasetSpec(
        source=source,
        replicas=replicas,
        all_nodes=all_nodes,
        node_selector=(
            validate_labels(dataset.node_selector, "node_selector")
            if "node_selector" in paths_set
            else record.node_selector
        ),
        tolerations=(
            validate_tolerations(dataset.tolerations)
            if "tolerations" in paths_set
            else record.tolerations
        ),
        pin=dataset.pin if "pin" in paths_set else record.pin,
        credentials_secret=(
            validate_secret_name(dataset.credentials_secret)
            if "credentials_secret" in paths_set
            else record.credentials_secret
        ),
        # An unchanged max_replicas below new replicas simply stops demand scaling, so a
        # plain scale does not fail on it.
        max_replicas=(
            validate_max_replicas(dataset.max_replicas, replicas, all_nodes)
            if "max_replicas" in paths_set
            else record.max_replicas
        ),
    )
    return spec, source != record.source
