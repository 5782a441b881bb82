"""Parsing of the CLI's structured flags into API values, with errors that say what to write.

Pure functions, no I/O: `--replicas N|all`, `--node-selector key=value`,
`--toleration key[=value][:Effect]` (the `kubectl taint` syntax) and the update mask built from
the flags a user gave.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from datacache.v1 import datacache_pb2 as pb
from datacache.validation import MAX_REPLICAS, InvalidInput

EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Kubernetes qualified names: an optional DNS-subdomain prefix and '/', then a name of at most
# 63 characters, alphanumeric at both ends with '-', '_' and '.' inside.
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_replicas(value: str) -> tuple[int, bool]:
    """(replicas, all_nodes) from "N" or "all"."""
    if value.strip().lower() == "all":
        return 0, True
    try:
        replicas = int(value)
    except ValueError as exc:
        raise InvalidInput(
            f"--replicas {value!r} is neither a number nor 'all': give e.g. --replicas 2, or "
            "--replicas all for every matching node"
        ) from exc
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidInput(f"--replicas must be between 1 and {MAX_REPLICAS} or 'all', got {value}")
    return replicas, False


def _check_label_key(key: str, flag: str) -> str:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _LABEL_PREFIX.fullmatch(prefix)):
        raise InvalidInput(f"{flag}: {key!r} has an invalid prefix before '/' (a DNS subdomain)")
    if not _LABEL_NAME.fullmatch(name):
        raise InvalidInput(
            f"{flag}: {key!r} is not a valid label key: at most 63 letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit, optionally after 'prefix/'"
        )
    return key


def _check_label_value(value: str, flag: str) -> str:
    if value and not _LABEL_NAME.fullmatch(value):
        raise InvalidInput(
            f"{flag}: value {value!r} is not a valid label value: at most 63 letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    return value


def parse_node_selector(items: Iterable[str]) -> dict[str, str]:
    selector: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidInput(f"--node-selector {item!r}: write key=value, e.g. gpu=a100")
        key = _check_label_key(key.strip(), "--node-selector")
        if key in selector and selector[key] != value:
            raise InvalidInput(f"--node-selector gives {key!r} twice with different values")
        selector[key] = _check_label_value(value.strip(), "--node-selector")
    return selector


def parse_toleration(item: str) -> pb.Toleration:
    """`key=value:Effect` (Equal), `key:Effect` (Exists), `key=value` or `key` (any effect)."""
    spec, colon, effect = item.rpartition(":") if ":" in item else (item, "", "")
    if colon and effect not in EFFECTS:
        raise InvalidInput(
            f"--toleration {item!r}: effect {effect!r} is not one of {', '.join(EFFECTS)} "
            "(write key[=value][:Effect], e.g. gpu=true:NoSchedule)"
        )
    key, eq, value = spec.partition("=")
    if not key:
        raise InvalidInput(
            f"--toleration {item!r} has no key: write key[=value][:Effect], e.g. "
            "gpu=true:NoSchedule"
        )
    _check_label_key(key, "--toleration")
    if eq:
        return pb.Toleration(
            key=key,
            operator="Equal",
            value=_check_label_value(value, "--toleration"),
            effect=effect,
        )
    return pb.Toleration(key=key, operator="Exists", effect=effect)


@dataclass
class SpecFlags:
    """The dataset fields a create or update command was given (None: not given)."""

    source: str | None = None
    replicas: str | None = None
    node_selector: tuple[str, ...] | None = None
    tolerations: tuple[str, ...] | None = None
    pin: bool | None = None
    credentials_secret: str | None = None
    max_replicas: int | None = None

    def apply(self, dataset: pb.Dataset) -> list[str]:
        """Sets the given fields on `dataset`; returns the update-mask paths they cover."""
        paths: list[str] = []
        if self.source is not None:
            dataset.source = self.source
            paths.append("source")
        if self.replicas is not None:
            replicas, all_nodes = parse_replicas(self.replicas)
            dataset.replicas, dataset.all_nodes = replicas, all_nodes
            # Switching between a count and 'all' changes both fields.
            paths += ["all_nodes"] if all_nodes else ["replicas", "all_nodes"]
        if self.node_selector is not None:
            dataset.node_selector.clear()
            dataset.node_selector.update(parse_node_selector(self.node_selector))
            paths.append("node_selector")
        if self.tolerations is not None:
            del dataset.tolerations[:]
            dataset.tolerations.extend(parse_toleration(t) for t in self.tolerations)
            paths.append("tolerations")
        if self.pin is not None:
            dataset.pin = self.pin
            paths.append("pin")
        if self.credentials_secret is not None:
            dataset.credentials_secret = self.credentials_secret
            paths.append("credentials_secret")
        if self.max_replicas is not None:
            dataset.max_replicas = self.max_replicas
            paths.append("max_replicas")
        return paths
