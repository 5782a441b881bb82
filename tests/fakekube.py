"""A protocol-level fake Kubernetes API server for tests.

`FakeKubeAPI` serves the Kubernetes REST protocol over real HTTP/1.1 on
``127.0.0.1`` so that the official ``kubernetes`` Python client talks to it
exactly as it would talk to a kube-apiserver: same URLs, verbs, content types,
status codes, ``Status`` error bodies and chunked watch streams.

Faithful (mirrors kube-apiserver behaviour):

* URL layout ``/api/v1/...`` and ``/apis/<group>/<version>/...``, cluster-scoped
  and namespaced resources, listing namespaced resources across namespaces.
* A single, global, monotonically increasing ``resourceVersion`` (like etcd's
  revision) bumped on every write; ``metadata.uid`` (uuid4) and
  ``creationTimestamp`` assigned on create; ``generateName``.
* Create answers 201; ``409 AlreadyExists`` for duplicates; an object that
  already carries a ``resourceVersion`` is refused with 500, as the real
  storage layer does.
* Update (PUT): ``409 Conflict`` when the body's ``resourceVersion`` is set and
  stale, or when its ``uid`` does not match (UID precondition); unconditional
  updates (no ``resourceVersion``) are allowed, as for all built-in types here.
  Updates that change nothing are not written: no new ``resourceVersion`` and
  no watch event. ``Event`` allows create-on-update like the real registry.
* PATCH with ``application/merge-patch+json`` (RFC 7386),
  ``application/strategic-merge-patch+json`` and
  ``application/json-patch+json`` (RFC 6902: add, remove, replace, move, copy,
  test; ``~1``/``~0`` escaping). A ``resourceVersion`` inside the patch acts as
  compare-and-swap (409 on mismatch). Undecodable patches answer 400; JSON
  patches that cannot be applied (including a failed ``test`` op) answer 422
  ``Invalid`` with the message "the server rejected our request due to an error
  in our request", which is what the apiserver's patch handler returns.
  Strategic merge patch merges maps, deletes on ``null``, supports
  ``$patch: replace|delete``, ``$retainKeys`` and ``$deleteFromPrimitiveList``,
  and merges the lists whose Go type declares a patch merge key
  (``status.conditions``/``status.addresses`` by ``type``, ``spec.podCIDRs``,
  ``metadata.finalizers``, ``metadata.ownerReferences`` by ``uid``); all other
  lists are replaced.
* Node ``status`` subresource: writes to the main resource keep the stored
  status, writes to ``/status`` keep the stored spec; allocatable defaults to
  capacity.
* DELETE returns a success ``Status``; delete preconditions (uid,
  resourceVersion) answer 409; objects with finalizers get a
  ``deletionTimestamp`` and disappear once an update empties the finalizers.
  ``deletecollection`` returns the deleted items.
* ``dryRun=All`` validates without persisting.
* LIST with ``labelSelector`` (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``,
  ``k in (..)``, ``k notin (..)``, ``k>n``, ``k<n``) and ``fieldSelector``
  (``=``, ``==``, ``!=`` on ``metadata.name``, ``metadata.namespace`` and the
  per-resource fields the apiserver supports, e.g. ``spec.unschedulable``);
  unsupported field labels answer 400. List items carry no ``kind`` or
  ``apiVersion``, as in real list responses.
* WATCH (``watch=true``) streams newline-delimited ``ADDED``/``MODIFIED``/
  ``DELETED`` events over chunked transfer encoding, replays events after the
  requested ``resourceVersion`` from a bounded history, sends synthetic
  ``ADDED`` events for the current state when no (or ``"0"``)
  ``resourceVersion`` is given, turns selector transitions into ``ADDED`` /
  ``DELETED`` like the watch cache, and ends with an ``ERROR`` event carrying a
  410 ``Expired`` ``Status`` when the version is older than the history
  window. ``timeoutSeconds`` is honoured.
* Errors are ``Status`` objects (``NotFound``, ``AlreadyExists``,
  ``Conflict``, ``Invalid`` with causes, ``BadRequest``, ...); messages follow
  the apiserver's wording. Requests need a bearer token (any non-empty token).
* Empty metadata maps and lists (``labels``, ``annotations``, ``finalizers``)
  and ``null`` fields are omitted from responses, as Go's ``omitempty`` does.
* Validation of object metadata (names, label keys and values, annotation
  keys, finalizer names), node taints and lease durations.
* Secrets: write-only ``stringData`` is folded into base64 ``data``; data keys
  and base64 values are validated; ``type`` defaults to ``Opaque``.
* Custom resources from a CustomResourceDefinition (`custom_resource`):
  status subresource, ``metadata.generation`` bumped on changes outside
  metadata and status, updates must carry a ``resourceVersion``, strategic
  merge patch answers 415, unknown fields are pruned and objects validated
  against the version's ``openAPIV3Schema`` (CEL rules are not evaluated).

Not implemented (requests for these are refused or the feature is absent):

* Server-side apply (``application/apply-patch+yaml``) answers 415;
  ``managedFields`` are not maintained; ``metadata.generation`` is set for
  custom resources only.
* No schema for built-in types: unknown fields are stored as sent rather than pruned, and
  timestamps are stored verbatim instead of being re-serialised.
  ``fieldValidation`` and ``fieldManager`` are ignored.
* Namespaces are not objects: every namespace implicitly exists.
* ``limit``/``continue`` are ignored and every list is complete, which the
  API contract allows. LIST ignores ``resourceVersion``/``resourceVersionMatch``
  and always serves the latest state.
* No bookmarks, no ``sendInitialEvents``; a watch from a ``resourceVersion``
  newer than the current one ends with a 504 ``Timeout`` error event at once
  instead of waiting for the store to catch up. The default watch duration
  (no ``timeoutSeconds``) is ``default_watch_timeout`` rather than the
  apiserver's randomised 30-60 minutes.
* Only JSON: no protobuf, CBOR, YAML bodies or ``Table`` output. Graceful
  deletion, owner-reference garbage collection, admission (so no
  ValidatingAdmissionPolicy), RBAC, discovery (only ``/version`` is served),
  CustomResourceDefinition objects themselves and every other resource are
  absent.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import random
import re
import select
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

Obj = dict[str, Any]

_logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
_PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)

ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_NODE_CAPACITY: Mapping[str, str] = {
    "cpu": "4",
    "memory": "16Gi",
    "ephemeral-storage": "100Gi",
    "pods": "110",
}

# The apiserver's optimistic-lock wording; clients match on the reason, but
# humans reading test failures match on this text.
_OPTIMISTIC_LOCK_MSG = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
_RV_ON_CREATE = "resourceVersion should not be set on objects to be created"
# Metadata an update cannot change; the stored values win, as in rest.BeforeUpdate.
_SERVER_OWNED_META = ("creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
_STANDARD_FINALIZERS = frozenset({"kubernetes", "orphan", "foregroundDeletion"})
_GENERATE_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_REASONS: Mapping[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_WAIT_SLICE = 0.25
_STOP_JOIN_TIMEOUT = 5.0


# --------------------------------------------------------------------------- errors


class FieldError(NamedTuple):
    """One field validation failure, shaped like apimachinery's field.Error."""

    field: str
    kind: str  # a key of _FIELD_ERROR_TYPES
    detail: str
    value: Any = None

    @property
    def body(self) -> str:
        label, shows_value = _FIELD_ERROR_TYPES[self.kind][1:]
        text = f"{label}: {_go_value(self.value)}" if shows_value else label
        return f"{text}: {self.detail}" if self.detail else text

    @property
    def reason(self) -> str:
        return _FIELD_ERROR_TYPES[self.kind][0]


# kind -> (cause reason, message label, whether the value is shown)
_FIELD_ERROR_TYPES: Mapping[str, tuple[str, str, bool]] = {
    "Invalid": ("FieldValueInvalid", "Invalid value", True),
    "Required": ("FieldValueRequired", "Required value", False),
    "Forbidden": ("FieldValueForbidden", "Forbidden", False),
    "NotSupported": ("FieldValueNotSupported", "Unsupported value", True),
    "Duplicate": ("FieldValueDuplicate", "Duplicate value", True),
    "TooLong": ("FieldValueTooLong", "Too long", False),
}


class KubeError(Exception):
    """An apiserver error, rendered as a ``Status`` object."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Obj | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason if reason is not None else _REASONS.get(code, "Unknown")
        self.details = details
        self.headers: Mapping[str, str] = headers or {}

    def status(self) -> Obj:
        status: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


def _go_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _bad_request(message: str) -> KubeError:
    return KubeError(400, message)


# --------------------------------------------------------------------------- resources


FieldGetter = Callable[[Obj], str]


@dataclass(frozen=True, eq=False)
class ResourceType:
    """Describes one REST resource served by the fake.

    ``list_merge_keys`` maps dotted field paths (list elements do not add a
    path component) to the strategic-merge-patch merge key of that list, or to
    ``None`` for lists of scalars that merge as sets. ``field_selectors`` adds
    resource-specific field labels on top of ``metadata.name`` (and
    ``metadata.namespace`` for namespaced resources).
    """

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    allow_create_on_update: bool = False
    allow_unconditional_update: bool = True
    list_merge_keys: Mapping[str, str | None] = field(default_factory=dict)
    field_selectors: Mapping[str, FieldGetter] = field(default_factory=dict)
    defaulter: Callable[[Obj], None] | None = None
    validator: Callable[[Obj], list[FieldError]] | None = None
    normalizer: Callable[[Obj], None] | None = None
    strategic_merge_patch: bool = True
    """False for custom resources: the apiserver answers 415 to strategic merge patches."""
    track_generation: bool = False
    """Maintain ``metadata.generation``: 1 on create, +1 on every change outside metadata and
    status (custom resources, and built-in types with a spec)."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """``plural.group`` as the apiserver spells a group-resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def details(self, name: str, **extra: Any) -> Obj:
        details: Obj = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.plural
        details.update(extra)
        return details

    def selectable_fields(self, obj: Obj) -> dict[str, str]:
        meta = obj.get("metadata") or {}
        fields = {"metadata.name": str(meta.get("name", ""))}
        if self.namespaced:
            fields["metadata.namespace"] = str(meta.get("namespace", ""))
        for label, getter in self.field_selectors.items():
            fields[label] = getter(obj)
        return fields


def _path_get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _str_field(dotted: str) -> FieldGetter:
    def getter(obj: Obj) -> str:
        value = _path_get(obj, dotted)
        return "" if value is None else str(value)

    return getter


def _node_unschedulable(obj: Obj) -> str:
    # Go formats the bool with fmt.Sprint.
    return "true" if _path_get(obj, "spec.unschedulable") is True else "false"


def _default_node(obj: Obj) -> None:
    status = obj.get("status")
    if isinstance(status, dict) and not status.get("allocatable") and status.get("capacity"):
        status["allocatable"] = copy.deepcopy(status["capacity"])


def _validate_node(obj: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    taints = _path_get(obj, "spec.taints") or []
    if not isinstance(taints, list):
        return [FieldError("spec.taints", "Invalid", "must be a list", taints)]
    seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(taints):
        path = f"spec.taints[{i}]"
        if not isinstance(taint, dict):
            errors.append(FieldError(path, "Invalid", "must be an object", taint))
            continue
        key = taint.get("key", "")
        if not key:
            errors.append(FieldError(f"{path}.key", "Required", ""))
        for msg in _qualified_name_errors(key) if key else []:
            errors.append(FieldError(f"{path}.key", "Invalid", msg, key))
        value = taint.get("value", "")
        for msg in _label_value_errors(value):
            errors.append(FieldError(f"{path}.value", "Invalid", msg, value))
        effect = taint.get("effect", "")
        if not effect:
            errors.append(FieldError(f"{path}.effect", "Required", ""))
        elif effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            errors.append(
                FieldError(
                    f"{path}.effect",
                    "NotSupported",
                    'supported values: "NoExecute", "NoSchedule", "PreferNoSchedule"',
                    effect,
                )
            )
        if (key, effect) in seen:
            errors.append(
                FieldError(
                    f"{path}.effect",
                    "Duplicate",
                    "taints must be unique by key and effect pair",
                    effect,
                )
            )
        seen.add((key, effect))
    return errors


def _normalize_node(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    for key in ("taints", "podCIDRs"):
        if spec.get(key) == []:
            del spec[key]
    if spec.get("unschedulable") is False:
        del spec["unschedulable"]
    status = obj.setdefault("status", {})
    for key, value in list(status.items()):
        if value in ({}, []):
            del status[key]


def _validate_lease(obj: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    spec = obj.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        errors.append(
            FieldError("spec.leaseDurationSeconds", "Invalid", "must be greater than 0", duration)
        )
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        errors.append(
            FieldError(
                "spec.leaseTransitions",
                "Invalid",
                "must be greater than or equal to 0",
                transitions,
            )
        )
    return errors


def _normalize_with_spec(obj: Obj) -> None:
    obj.setdefault("spec", {})


_META_LIST_KEYS: Mapping[str, str | None] = {
    "metadata.finalizers": None,
    "metadata.ownerReferences": "uid",
}

NODES = ResourceType(
    group="",
    version="v1",
    plural="nodes",
    kind="Node",
    namespaced=False,
    status_subresource=True,
    list_merge_keys={
        **_META_LIST_KEYS,
        "spec.podCIDRs": None,
        "status.conditions": "type",
        "status.addresses": "type",
    },
    field_selectors={"spec.unschedulable": _node_unschedulable},
    defaulter=_default_node,
    validator=_validate_node,
    normalizer=_normalize_node,
)

LEASES = ResourceType(
    group="coordination.k8s.io",
    version="v1",
    plural="leases",
    kind="Lease",
    namespaced=True,
    list_merge_keys=_META_LIST_KEYS,
    validator=_validate_lease,
    normalizer=_normalize_with_spec,
)

EVENTS = ResourceType(
    group="",
    version="v1",
    plural="events",
    kind="Event",
    namespaced=True,
    allow_create_on_update=True,
    list_merge_keys=_META_LIST_KEYS,
    field_selectors={
        "involvedObject.kind": _str_field("involvedObject.kind"),
        "involvedObject.namespace": _str_field("involvedObject.namespace"),
        "involvedObject.name": _str_field("involvedObject.name"),
        "involvedObject.uid": _str_field("involvedObject.uid"),
        "involvedObject.apiVersion": _str_field("involvedObject.apiVersion"),
        "involvedObject.resourceVersion": _str_field("involvedObject.resourceVersion"),
        "involvedObject.fieldPath": _str_field("involvedObject.fieldPath"),
        "reason": _str_field("reason"),
        "reportingComponent": _str_field("reportingComponent"),
        "source": _str_field("source.component"),
        "type": _str_field("type"),
    },
)

_SECRET_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")


def _normalize_secret(obj: Obj) -> None:
    # The apiserver folds write-only stringData into data (base64) and never returns it.
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict):
        data = obj.setdefault("data", {})
        if isinstance(data, dict):
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode("utf-8")).decode("ascii")
    obj.setdefault("type", "Opaque")
    if obj.get("data") == {}:
        del obj["data"]


def _validate_secret(obj: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        return [FieldError("data", "Invalid", "must be an object", data)]
    for key, value in data.items():
        if not _SECRET_KEY_RE.match(key) or len(key) > 253:
            errors.append(
                FieldError(
                    f"data[{key}]",
                    "Invalid",
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
                    " (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for"
                    " validation is '[-._a-zA-Z0-9]+')",
                    key,
                )
            )
        try:
            base64.b64decode(str(value), validate=True)
        except ValueError:
            # encoding/json refuses to decode a []byte field from bad base64.
            errors.append(FieldError(f"data[{key}]", "Invalid", "illegal base64 data", value))
    return errors


SECRETS = ResourceType(
    group="",
    version="v1",
    plural="secrets",
    kind="Secret",
    namespaced=True,
    list_merge_keys=_META_LIST_KEYS,
    field_selectors={"type": _str_field("type")},
    validator=_validate_secret,
    normalizer=_normalize_secret,
)

DEFAULT_RESOURCES: tuple[ResourceType, ...] = (NODES, LEASES, EVENTS, SECRETS)


def _spec_part(obj: Obj) -> Obj:
    """What ``metadata.generation`` counts changes of: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _prune(value: Any, schema: Mapping[str, Any]) -> Any:
    """Drop fields a structural schema does not declare, as the apiserver does for custom
    resources (unless ``x-kubernetes-preserve-unknown-fields``)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if properties is not None:
            return {k: _prune(v, properties[k]) for k, v in value.items() if k in properties}
        if isinstance(extra, dict):
            return {k: _prune(v, extra) for k, v in value.items()}
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"]) for v in value]
    return value


def custom_resource(crd: Mapping[str, Any], version: str | None = None) -> ResourceType:
    """The `ResourceType` of a CustomResourceDefinition (as loaded from its YAML): served like
    the apiserver serves custom resources: status subresource if declared,
    ``metadata.generation``, no unconditional updates, no strategic merge patch, unknown fields
    pruned and objects validated against the version's ``openAPIV3Schema`` (types, required,
    enums, patterns, bounds; CEL ``x-kubernetes-validations`` rules are not evaluated).
    """
    import jsonschema  # type: ignore[import-untyped]  # only custom resources need it

    spec = crd["spec"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    chosen = next((v for v in served if version is None or v["name"] == version), None)
    if chosen is None:
        raise KeyError(f"CRD {crd['metadata']['name']} serves no version {version!r}")
    schema: Mapping[str, Any] = (chosen.get("schema") or {}).get("openAPIV3Schema") or {}
    checker = jsonschema.Draft7Validator(schema)

    def normalize(obj: Obj) -> None:
        metadata = obj.pop("metadata")
        pruned = _prune(obj, schema)
        obj.clear()
        obj.update(pruned)
        obj["metadata"] = metadata

    def validate(obj: Obj) -> list[FieldError]:
        errors = []
        body = {k: v for k, v in obj.items() if k != "metadata"}
        for error in sorted(checker.iter_errors(body), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in error.absolute_path) or "<root>"
            reason = "Required" if error.validator == "required" else "Invalid"
            errors.append(FieldError(path, reason, error.message, error.instance))
        return errors

    names = spec["names"]
    return ResourceType(
        group=spec["group"],
        version=chosen["name"],
        plural=names["plural"],
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        status_subresource="status" in (chosen.get("subresources") or {}),
        allow_unconditional_update=False,
        list_merge_keys=_META_LIST_KEYS,
        normalizer=normalize,
        validator=validate,
        strategic_merge_patch=False,
        track_generation=True,
    )


# --------------------------------------------------------------------------- validation

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE = re.compile(rf"^{_DNS_LABEL}$")
_DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME_FMT = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with"
    " an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for"
    " validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_SUBDOMAIN_FMT = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-'"
    " or '.', and must start and end with an alphanumeric character (e.g. 'example.com',"
    " regex used for validation is"
    " '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_VALUE_FMT = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_'"
    " or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or"
    " 'my_value',  or '12345', regex used for validation is"
    " '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


def _subdomain_errors(value: str) -> list[str]:
    errors = []
    if len(value) > 253:
        errors.append("must be no more than 253 characters")
    if not _DNS_SUBDOMAIN_RE.match(value):
        errors.append(_SUBDOMAIN_FMT)
    return errors


def _qualified_name_errors(value: Any) -> list[str]:
    if not isinstance(value, str):
        return ["must be a string"]
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
        errors: list[str] = []
    elif len(parts) == 2:
        prefix, name = parts
        errors = (
            ["prefix part must be non-empty"]
            if not prefix
            else [f"prefix part {msg}" for msg in _subdomain_errors(prefix)]
        )
    else:
        return [
            "a qualified name "
            + _QUALIFIED_NAME_FMT
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    elif not _QUALIFIED_NAME_RE.match(name):
        errors.append("name part " + _QUALIFIED_NAME_FMT)
    return errors


def _label_value_errors(value: Any) -> list[str]:
    if not isinstance(value, str):
        return ["must be a string"]
    errors = []
    if len(value) > 63:
        errors.append("must be no more than 63 characters")
    if not _LABEL_VALUE_RE.match(value):
        errors.append(_LABEL_VALUE_FMT)
    return errors


def _validate_metadata(rt: ResourceType, obj: Obj) -> list[FieldError]:
    meta = obj["metadata"]
    errors: list[FieldError] = []
    name = meta.get("name", "")
    if not name:
        errors.append(FieldError("metadata.name", "Required", "name or generateName is required"))
    else:
        for msg in _subdomain_errors(name):
            errors.append(FieldError("metadata.name", "Invalid", msg, name))
    if rt.namespaced:
        namespace = meta.get("namespace", "")
        if not namespace:
            errors.append(FieldError("metadata.namespace", "Required", ""))
        elif len(namespace) > 63 or not _DNS_LABEL_RE.match(namespace):
            errors.append(
                FieldError(
                    "metadata.namespace",
                    "Invalid",
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric"
                    " characters or '-', and must start and end with an alphanumeric character",
                    namespace,
                )
            )
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        errors.append(FieldError("metadata.labels", "Invalid", "must be a map", labels))
    else:
        for key, value in labels.items():
            for msg in _qualified_name_errors(key):
                errors.append(FieldError("metadata.labels", "Invalid", msg, key))
            for msg in _label_value_errors(value):
                errors.append(FieldError("metadata.labels", "Invalid", msg, value))
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        errors.append(FieldError("metadata.annotations", "Invalid", "must be a map", annotations))
    else:
        total = 0
        for key, value in annotations.items():
            for msg in _qualified_name_errors(key.lower() if isinstance(key, str) else key):
                errors.append(FieldError("metadata.annotations", "Invalid", msg, key))
            if not isinstance(value, str):
                errors.append(
                    FieldError("metadata.annotations", "Invalid", "must be a string", value)
                )
            else:
                total += len(key) + len(value)
        if total > 256 * 1024:
            errors.append(
                FieldError("metadata.annotations", "TooLong", "must have at most 262144 bytes")
            )
    finalizers = meta.get("finalizers") or []
    if not isinstance(finalizers, list):
        errors.append(FieldError("metadata.finalizers", "Invalid", "must be a list", finalizers))
    else:
        for i, finalizer in enumerate(finalizers):
            path = f"metadata.finalizers[{i}]"
            msgs = _qualified_name_errors(finalizer)
            for msg in msgs:
                errors.append(FieldError(path, "Invalid", msg, finalizer))
            if not msgs and "/" not in finalizer and finalizer not in _STANDARD_FINALIZERS:
                errors.append(
                    FieldError(
                        path,
                        "Invalid",
                        "name is neither a standard finalizer name nor is it fully qualified",
                        finalizer,
                    )
                )
    return errors


def _invalid(rt: ResourceType, name: str, errors: list[FieldError]) -> KubeError:
    texts = [f"{e.field}: {e.body}" for e in errors]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: Obj = {"name": name}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.kind
    details["causes"] = [{"reason": e.reason, "message": e.body, "field": e.field} for e in errors]
    return KubeError(422, f'{rt.group_kind} "{name}" is invalid: {summary}', details=details)


def _not_found(rt: ResourceType, name: str) -> KubeError:
    return KubeError(404, f'{rt.key} "{name}" not found', details=rt.details(name))


def _conflict(rt: ResourceType, name: str, why: str = _OPTIMISTIC_LOCK_MSG) -> KubeError:
    return KubeError(
        409,
        f'Operation cannot be fulfilled on {rt.key} "{name}": {why}',
        reason="Conflict",
        details=rt.details(name),
    )


def _rejected_patch(message: str) -> KubeError:
    # errors.NewGenericServerResponse(422, ...) as used by the patch handler.
    return KubeError(
        422,
        "the server rejected our request due to an error in our request",
        reason="Invalid",
        details={"causes": [{"reason": "UnexpectedServerResponse", "message": message}]},
    )


# --------------------------------------------------------------------------- selectors


class _Requirement(NamedTuple):
    key: str
    op: str  # "exists", "!", "=", "!=", "in", "notin", "gt", "lt"
    values: tuple[str, ...]


_LABEL_TOKEN_RE = re.compile(r"\s*(!=|==|=|!|\(|\)|,|<|>|[^\s!=(),<>]+)\s*")


def _parse_label_selector(text: str) -> tuple[_Requirement, ...]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        match = _LABEL_TOKEN_RE.match(text, pos)
        if match is None:
            raise _bad_request(f"unable to parse requirement: unexpected input at {text[pos:]!r}")
        tokens.append(match.group(1))
        pos = match.end()

    def fail(msg: str) -> KubeError:
        return _bad_request(f"unable to parse requirement: {msg}")

    def check_key(key: str) -> str:
        errors = _qualified_name_errors(key)
        if key in ("!", "=", "==", "!=", "(", ")", ",", "<", ">") or errors:
            raise fail(f"key: Invalid value: {json.dumps(key)}: {'; '.join(errors)}")
        return key

    def check_value(value: str) -> str:
        errors = _label_value_errors(value)
        if errors:
            raise fail(f"values[0]: Invalid value: {json.dumps(value)}: {'; '.join(errors)}")
        return value

    requirements: list[_Requirement] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "!":
            if i + 1 >= len(tokens):
                raise fail("missing key after '!'")
            requirements.append(_Requirement(check_key(tokens[i + 1]), "!", ()))
            i += 2
        else:
            key = check_key(tokens[i])
            i += 1
            op = tokens[i] if i < len(tokens) else ","
            if op == ",":
                requirements.append(_Requirement(key, "exists", ()))
            elif op in ("=", "==", "!="):
                i += 1
                value = ""
                if i < len(tokens) and tokens[i] != ",":
                    value = tokens[i]
                    i += 1
                equality = "!=" if op == "!=" else "="
                requirements.append(_Requirement(key, equality, (check_value(value),)))
            elif op in ("in", "notin"):
                i += 1
                if i >= len(tokens) or tokens[i] != "(":
                    raise fail(f"found '{tokens[i] if i < len(tokens) else ''}', expected: '('")
                i += 1
                values: list[str] = []
                while i < len(tokens) and tokens[i] != ")":
                    if tokens[i] != ",":
                        values.append(check_value(tokens[i]))
                    i += 1
                if i >= len(tokens):
                    raise fail("found '', expected: ')'")
                i += 1
                if not values:
                    raise fail("for 'in', 'notin' operators, values set can't be empty")
                requirements.append(_Requirement(key, op, tuple(values)))
            elif op in ("<", ">"):
                i += 1
                if i >= len(tokens) or not re.fullmatch(r"-?\d+", tokens[i]):
                    raise fail("for 'Gt', 'Lt' operators, the value must be an integer")
                requirements.append(_Requirement(key, "gt" if op == ">" else "lt", (tokens[i],)))
                i += 1
            else:
                raise fail(f"found '{op}', expected: in, notin, =, ==, !=, gt, lt")
        if i < len(tokens):
            if tokens[i] != ",":
                raise fail(f"found '{tokens[i]}', expected: ',' or 'end of string'")
            i += 1
            if i >= len(tokens):
                raise fail("found '', expected: identifier")
    return tuple(requirements)


def _requirement_matches(req: _Requirement, labels: Mapping[str, str]) -> bool:
    present = req.key in labels
    value = labels.get(req.key)
    if req.op == "exists":
        return present
    if req.op == "!":
        return not present
    if req.op == "=":
        return present and value == req.values[0]
    if req.op == "!=":
        # Like apimachinery, "!=" also matches objects without the label.
        return not present or value != req.values[0]
    if req.op == "in":
        return present and value in req.values
    if req.op == "notin":
        return not present or value not in req.values
    if not present or value is None or not re.fullmatch(r"-?\d+", value):
        return False
    bound = int(req.values[0])
    return int(value) > bound if req.op == "gt" else int(value) < bound


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise _bad_request(f"invalid field selector: {text!r}: trailing backslash")
    parts.append("".join(current))
    return parts


def _unescape_field_value(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _parse_field_selector(rt: ResourceType, text: str) -> tuple[tuple[str, str, str], ...]:
    supported = set(rt.selectable_fields({"metadata": {}}))
    terms: list[tuple[str, str, str]] = []
    for term in _split_unescaped(text, ","):
        if not term:
            continue
        match = re.match(r"^([^=!]+)(!=|==|=)(.*)$", term)
        if match is None:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        key, op, value = match.group(1).strip(), match.group(2), match.group(3)
        if key not in supported:
            raise _bad_request(f"field label not supported: {key}")
        terms.append((key, "!=" if op == "!=" else "=", _unescape_field_value(value)))
    return tuple(terms)


@dataclass(frozen=True)
class _Selector:
    rt: ResourceType
    namespace: str | None
    labels: tuple[_Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(_requirement_matches(req, labels) for req in self.labels):
            return False
        if self.fields:
            values = self.rt.selectable_fields(obj)
            for key, op, expected in self.fields:
                if (values.get(key) == expected) != (op == "="):
                    return False
        return True


# --------------------------------------------------------------------------- patches


class _PatchApplyError(Exception):
    pass


def _json_equal(a: Any, b: Any) -> bool:
    # Serialising separates true from 1, which Python's == does not.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _pointer_tokens(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise _PatchApplyError(f"path must be a string, got {_go_value(path)}")
    if path == "":
        return []
    if not path.startswith("/"):
        raise _PatchApplyError(f'invalid JSON pointer "{path}"')
    # RFC 6901: "~1" first, then "~0", so "~01" decodes to "~1".
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _array_index(token: str, length: int, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return length
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise _PatchApplyError(f"invalid array index {token!r}")
    index = int(token)
    if index > length or (index == length and not allow_end):
        raise _PatchApplyError(f"array index {index} out of bounds")
    return index


def _pointer_parent(doc: Any, tokens: list[str], op: str, path: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_array_index(token, len(node), allow_end=False)]
        else:
            raise _PatchApplyError(f'{op} operation does not apply: doc is missing path: "{path}"')
    if not isinstance(node, (dict, list)):
        raise _PatchApplyError(f'{op} operation does not apply: doc is missing path: "{path}"')
    return node


def _pointer_get(doc: Any, path: str, op: str) -> Any:
    node = doc
    for token in _pointer_tokens(path):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_array_index(token, len(node), allow_end=False)]
        else:
            raise _PatchApplyError(f'{op} operation does not apply: doc is missing path: "{path}"')
    return node


def _pointer_add(doc: Any, path: str, value: Any, op: str = "add") -> Any:
    tokens = _pointer_tokens(path)
    if not tokens:
        return value
    parent = _pointer_parent(doc, tokens, op, path)
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    else:
        parent.insert(_array_index(tokens[-1], len(parent), allow_end=True), value)
    return doc


def _pointer_remove(doc: Any, path: str, op: str = "remove") -> Any:
    tokens = _pointer_tokens(path)
    if not tokens:
        raise _PatchApplyError(f"{op} operation does not apply: cannot remove the whole document")
    parent = _pointer_parent(doc, tokens, op, path)
    if isinstance(parent, dict):
        if tokens[-1] not in parent:
            raise _PatchApplyError(
                f'{op} operation does not apply: doc is missing key: "{path}": missing value'
            )
        return parent.pop(tokens[-1])
    return parent.pop(_array_index(tokens[-1], len(parent), allow_end=False))


def _apply_json_patch(doc: Obj, operations: list[Any]) -> Any:
    result: Any = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict):
            raise _PatchApplyError("operation must be an object")
        op = operation.get("op")
        raw_path = operation.get("path")
        if not isinstance(raw_path, str):
            raise _PatchApplyError(f"{op} operation missing path")
        path: str = raw_path
        if op == "add":
            if "value" not in operation:
                raise _PatchApplyError("add operation missing value")
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            _pointer_remove(result, path)
        elif op == "replace":
            if "value" not in operation:
                raise _PatchApplyError("replace operation missing value")
            tokens = _pointer_tokens(path)
            if not tokens:
                result = copy.deepcopy(operation["value"])
                continue
            parent = _pointer_parent(result, tokens, "replace", path)
            if isinstance(parent, dict):
                if tokens[-1] not in parent:
                    raise _PatchApplyError(
                        "replace operation does not apply: doc is missing key:"
                        f" {path}: missing value"
                    )
                parent[tokens[-1]] = copy.deepcopy(operation["value"])
            else:
                parent[_array_index(tokens[-1], len(parent), allow_end=False)] = copy.deepcopy(
                    operation["value"]
                )
        elif op in ("move", "copy"):
            source = operation.get("from")
            if not isinstance(source, str):
                raise _PatchApplyError(f"{op} operation missing from")
            if op == "move":
                if path == source:
                    continue
                if isinstance(path, str) and path.startswith(source + "/"):
                    raise _PatchApplyError("move operation cannot move a value into itself")
                value = _pointer_remove(result, source, "move")
            else:
                value = copy.deepcopy(_pointer_get(result, source, "copy"))
            result = _pointer_add(result, path, value, op)
        elif op == "test":
            if "value" not in operation:
                raise _PatchApplyError("test operation missing value")
            try:
                actual = _pointer_get(result, path, "test")
            except _PatchApplyError:
                raise _PatchApplyError(f"testing value {path} failed: test failed") from None
            if not _json_equal(actual, operation["value"]):
                raise _PatchApplyError(f"testing value {path} failed: test failed")
        else:
            raise _PatchApplyError(f"Unexpected kind: {op}")
    return result


def _apply_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _apply_merge_patch(result.get(key), value)
    return result


def _is_directive(key: str) -> bool:
    return key in ("$patch", "$retainKeys") or key.startswith(
        ("$setElementOrder/", "$deleteFromPrimitiveList/")
    )


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_directives(v)
            for k, v in value.items()
            if not _is_directive(k) and v is not None
        }
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _apply_strategic_patch(
    original: Obj, patch: Obj, path: str, keys: Mapping[str, str | None]
) -> Obj:
    directive = patch.get("$patch")
    if directive == "replace":
        return dict(_strip_directives(patch))
    if directive not in (None, "delete"):
        raise _bad_request(f"Unknown patch type: {directive}")
    result = dict(original)
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            target = key.split("/", 1)[1]
            if not isinstance(value, list):
                raise _bad_request("invalid patch: $deleteFromPrimitiveList must be a list")
            current = result.get(target)
            if isinstance(current, list):
                result[target] = [item for item in current if item not in value]
    for key, value in patch.items():
        if _is_directive(key):
            continue
        child = f"{path}.{key}" if path else key
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            if value.get("$patch") == "delete":
                result.pop(key, None)
                continue
            current = result.get(key)
            result[key] = _apply_strategic_patch(
                current if isinstance(current, dict) else {}, value, child, keys
            )
        elif isinstance(value, list):
            current = result.get(key)
            result[key] = _strategic_list(
                current if isinstance(current, list) else [], value, child, keys
            )
        else:
            result[key] = value
    retain = patch.get("$retainKeys")
    if retain is not None:
        if not isinstance(retain, list):
            raise _bad_request("invalid patch: $retainKeys must be a list")
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _strategic_list(
    original: list[Any], patch: list[Any], path: str, keys: Mapping[str, str | None]
) -> list[Any]:
    if path not in keys:
        return list(_strip_directives(patch))
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [
            _strip_directives(item)
            for item in patch
            if not (isinstance(item, dict) and item.get("$patch") == "replace")
        ]
    merge_key = keys[path]
    result = list(original)
    if merge_key is None:
        for item in patch:
            if not any(_json_equal(item, existing) for existing in result):
                result.append(item)
        return result
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise _bad_request(f"map: {item} does not contain declared merge key: {merge_key}")
        index = next(
            (
                i
                for i, existing in enumerate(result)
                if isinstance(existing, dict)
                and _json_equal(existing.get(merge_key), item[merge_key])
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_apply_strategic_patch({}, item, path, keys))
        else:
            result[index] = _apply_strategic_patch(result[index], item, path, keys)
    return result


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class _Change:
    rv: int
    type: str
    rt_key: str
    obj: Obj
    prev: Obj | None


class RecordedRequest(NamedTuple):
    """An HTTP request seen by the fake; ``path`` excludes the query string."""

    method: str
    path: str
    content_type: str | None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _object_key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


def _list_item(obj: Obj) -> Obj:
    # Items of a typed list response carry no TypeMeta.
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _node_body(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    capacity: Mapping[str, str] | None = None,
    allocatable: Mapping[str, str] | None = None,
    taints: Iterable[Mapping[str, Any]] | None = None,
    unschedulable: bool = False,
    zone: str | None = None,
    ready: bool = True,
) -> Obj:
    node_labels = dict(labels or {})
    if zone is not None:
        node_labels[ZONE_LABEL] = zone
    node_capacity = dict(capacity if capacity is not None else DEFAULT_NODE_CAPACITY)
    node_allocatable = dict(allocatable if allocatable is not None else node_capacity)
    now = _now()
    spec: Obj = {}
    if taints:
        spec["taints"] = [dict(t) for t in taints]
    if unschedulable:
        spec["unschedulable"] = True
    return copy.deepcopy(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": node_labels,
                "annotations": dict(annotations or {}),
            },
            "spec": spec,
            "status": {
                "capacity": node_capacity,
                "allocatable": node_allocatable,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "KubeletReady" if ready else "KubeletNotReady",
                        "message": (
                            "kubelet is posting ready status" if ready else "kubelet is not ready"
                        ),
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
            },
        }
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # stop() joins the handler threads itself, with a deadline.
    block_on_close = False

    def __init__(self, fake: FakeKubeAPI) -> None:
        self.fake = fake
        self.connections: dict[threading.Thread, socket.socket] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can stall on
        # machines without working DNS; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="fakekube-connection",
            daemon=True,
        )
        # Registered before start() so stop() can never miss a connection.
        with self.fake._lock:
            self.connections[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.fake._lock:
                self.connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called by socketserver with the exception being handled.
        if isinstance(sys.exc_info()[1], OSError):
            return  # the peer went away; nothing to report
        self.fake._record_error(traceback.format_exc())


class FakeKubeAPI:
    """A fake kube-apiserver on a free local port; see the module docstring.

    The server runs from construction until `stop` (or the end of a ``with``
    block). Test hooks are plain methods; they share the HTTP handlers' lock,
    produce watch events, take and return deep copies, and raise `KubeError`
    where the API would answer with an error (e.g. creating a duplicate).
    `inject_conflicts` and `fail_next` affect HTTP requests only.
    """

    def __init__(
        self,
        *,
        resources: Iterable[ResourceType] = (),
        history_limit: int = 1000,
        default_watch_timeout: float = 60.0,
    ) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self._resources: dict[str, ResourceType] = {}
        for rt in (*DEFAULT_RESOURCES, *resources):
            self._resources[rt.key] = rt
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in self._resources}
        self._rv = 1
        self._history: deque[_Change] = deque()
        self._history_floor = self._rv
        self._history_limit = history_limit
        self._default_watch_timeout = default_watch_timeout
        self._conflicts: dict[tuple[str, str, str], int] = {}
        self._failures: deque[tuple[int, str | None]] = deque()
        self._requests: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._watchers = 0
        self._stopping = False
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self._url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakekube-server",
            daemon=True,
        )
        try:
            self._thread.start()
        except BaseException:
            self._server.server_close()
            raise

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._url

    def stop(self) -> None:
        """Stop serving, end open watches and connections, join every thread.

        Idempotent. Raises RuntimeError if a thread is still alive after a
        bounded wait, because a leaked handler means a bug in the fake.
        """
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        with self._changed:
            if self._stopping:
                return
            self._stopping = True
            self._changed.notify_all()
            # Let open watches finish their chunked stream, so clients see a
            # clean end of the response rather than a reset connection.
            while self._watchers > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
        try:
            if self._thread.is_alive():
                self._server.shutdown()
        finally:
            with self._lock:
                connections = list(self._server.connections.items())
            for _, sock in connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._server.server_close()
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            for thread, _ in connections:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        leaked = [t.name for t, _ in connections if t.is_alive()]
        if self._thread.is_alive():
            leaked.append(self._thread.name)
        if leaked:
            raise RuntimeError(f"fake kube-apiserver threads did not exit: {leaked}")

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> Path:
        """Write a kubeconfig for this server (plain http, bearer token)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fakekube", "cluster": {"server": self._url}}],
            "users": [{"name": "fakekube", "user": {"token": "fakekube-token"}}],
            "contexts": [
                {
                    "name": "fakekube",
                    "context": {"cluster": "fakekube", "user": "fakekube", "namespace": "default"},
                }
            ],
            "current-context": "fakekube",
            "preferences": {},
        }
        target = Path(path)
        # JSON is valid YAML, so the client's YAML loader reads it.
        target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return target

    # ----------------------------------------------------------------- test hooks

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request seen so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def server_errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions inside the fake (should stay empty)."""
        with self._lock:
            return list(self._errors)

    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._rv)

    @property
    def active_watchers(self) -> int:
        with self._lock:
            return self._watchers

    def wait_for_watchers(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` watch streams are open (bounded)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._watchers < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def fail_next(self, n: int = 1, status: int = 500, *, method: str | None = None) -> None:
        """Answer the next ``n`` authenticated requests (with ``method``: the next ``n`` with
        that HTTP method, e.g. ``"PATCH"``) with a ``status`` error."""
        if n < 0 or not 400 <= status <= 599:
            raise ValueError("n must be >= 0 and status a 4xx/5xx code")
        with self._lock:
            self._failures.extend([(status, method)] * n)

    def inject_conflicts(
        self,
        resource: str = "nodes",
        *,
        name: str,
        namespace: str | None = None,
        count: int = 1,
    ) -> None:
        """Answer the next ``count`` PUT/PATCH requests to one object with 409 Conflict."""
        rt = self._resource(resource)
        with self._lock:
            key = (rt.key, namespace or "", name)
            self._conflicts[key] = self._conflicts.get(key, 0) + count

    def compact_history(self) -> None:
        """Forget all watch history, as etcd compaction does; older watches get 410."""
        with self._lock:
            self._history.clear()
            self._history_floor = self._rv

    def create_object(self, resource: str, obj: Obj, namespace: str | None = None) -> Obj:
        rt = self._resource(resource)
        with self._changed:
            return copy.deepcopy(self._create(rt, namespace, copy.deepcopy(obj), dry_run=False))

    def get_object(self, resource: str, name: str, namespace: str | None = None) -> Obj | None:
        rt = self._resource(resource)
        with self._lock:
            found = self._objects[rt.key].get((namespace or "", name))
            return copy.deepcopy(found) if found is not None else None

    def list_objects(self, resource: str, namespace: str | None = None) -> list[Obj]:
        rt = self._resource(resource)
        with self._lock:
            return [
                copy.deepcopy(obj)
                for key, obj in sorted(self._objects[rt.key].items())
                if namespace is None or key[0] == namespace
            ]

    def delete_object(self, resource: str, name: str, namespace: str | None = None) -> None:
        """Delete like an API client would (finalizers are honoured). KeyError if missing."""
        rt = self._resource(resource)
        with self._changed:
            if (namespace or "", name) not in self._objects[rt.key]:
                raise KeyError(f"{rt.key} {namespace or ''}/{name}")
            self._delete(rt, namespace, name, {}, dry_run=False)

    def add_node(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        capacity: Mapping[str, str] | None = None,
        allocatable: Mapping[str, str] | None = None,
        taints: Iterable[Mapping[str, Any]] | None = None,
        unschedulable: bool = False,
        zone: str | None = None,
        *,
        ready: bool = True,
    ) -> Obj:
        """Register a node the way a kubelet would; returns the stored object.

        ``zone`` sets ``topology.kubernetes.io/zone``. Capacity defaults to
        `DEFAULT_NODE_CAPACITY` (which includes ``ephemeral-storage``) and
        allocatable defaults to the capacity.
        """
        body = _node_body(
            name,
            labels=labels,
            annotations=annotations,
            capacity=capacity,
            allocatable=allocatable,
            taints=taints,
            unschedulable=unschedulable,
            zone=zone,
            ready=ready,
        )
        with self._changed:
            return copy.deepcopy(self._create(NODES, None, body, dry_run=False))

    def get_node(self, name: str) -> Obj | None:
        return self.get_object("nodes", name)

    def delete_node(self, name: str) -> None:
        self.delete_object("nodes", name)

    def recreate_node(self, name: str, *, compact: bool = False) -> Obj:
        """Replace a node by a newly registered one: new uid, labels, annotations
        and taints cleared, same capacity and allocatable (same machine).

        Watchers see DELETED then ADDED, as when a node object is deleted and
        its kubelet registers again. Finalizers are bypassed. KeyError if missing.
        With ``compact`` the watch history is forgotten in the same step (see
        `compact_history`), so open watches see neither event but a 410, as a
        watcher that was disconnected across the re-creation and an etcd
        compaction would.
        """
        with self._changed:
            old = self._objects[NODES.key].get(("", name))
            if old is None:
                raise KeyError(f"nodes {name}")
            status = old.get("status") or {}
            body = _node_body(
                name, capacity=status.get("capacity"), allocatable=status.get("allocatable")
            )
            self._remove(NODES, old)
            created = self._create(NODES, None, body, dry_run=False)
            if compact:
                self._history.clear()
                self._history_floor = self._rv
            return copy.deepcopy(created)

    # ----------------------------------------------------------------- internals (lock held)

    def _resource(self, resource: str) -> ResourceType:
        if resource in self._resources:
            return self._resources[resource]
        matches = [rt for rt in self._resources.values() if rt.plural == resource]
        if len(matches) != 1:
            raise KeyError(f"unknown or ambiguous resource {resource!r}")
        return matches[0]

    def _record_error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, change: _Change) -> None:
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._history_floor = self._history.popleft().rv
        self._changed.notify_all()

    def _check_type_meta(self, rt: ResourceType, body: Obj) -> None:
        api_version = body.get("apiVersion")
        if api_version not in (None, "", rt.api_version):
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected"
                f" API version ({rt.api_version})"
            )
        kind = body.get("kind")
        if kind not in (None, "", rt.kind):
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )

    def _finish(self, rt: ResourceType, obj: Obj) -> Obj:
        """Apply TypeMeta, defaults and omitempty normalisation to a candidate object."""
        obj = _drop_nulls(obj)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        meta = obj["metadata"]
        for key in list(meta):
            if meta[key] in ("", [], {}):
                del meta[key]
        if rt.defaulter is not None:
            rt.defaulter(obj)
        if rt.normalizer is not None:
            rt.normalizer(obj)
        return obj

    def _validate(self, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        errors = _validate_metadata(rt, obj)
        if rt.validator is not None:
            errors.extend(rt.validator(obj))
        if old is not None:
            meta, old_meta = obj["metadata"], old["metadata"]
            if meta.get("uid") != old_meta.get("uid"):
                errors.append(
                    FieldError("metadata.uid", "Invalid", "field is immutable", meta.get("uid"))
                )
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    errors.append(
                        FieldError(
                            "metadata.finalizers",
                            "Forbidden",
                            "no new finalizers can be added if the object is being deleted,"
                            f" found new finalizers {sorted(added)}",
                        )
                    )
        if errors:
            raise _invalid(rt, obj["metadata"].get("name", ""), errors)

    def _check_namespace(self, rt: ResourceType, meta: Obj, namespace: str | None) -> None:
        if rt.namespaced:
            if not meta.get("namespace"):
                meta["namespace"] = namespace or ""
            elif namespace is not None and meta["namespace"] != namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on"
                    " the request"
                )
        else:
            meta.pop("namespace", None)

    def _create(self, rt: ResourceType, namespace: str | None, body: Any, *, dry_run: bool) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request must be a JSON object")
        self._check_type_meta(rt, body)
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be a JSON object")
        self._check_namespace(rt, meta, namespace)
        if meta.get("resourceVersion"):
            # The storage layer refuses this with a plain error, which the
            # apiserver reports as an internal error.
            raise KubeError(
                500,
                f"Internal error occurred: {_RV_ON_CREATE}",
                details={"causes": [{"message": _RV_ON_CREATE}]},
            )
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choice(_GENERATE_NAME_ALPHABET) for _ in range(5))
            meta["name"] = f"{meta['generateName']}{suffix}"
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        for server_field in (
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
        ):
            meta.pop(server_field, None)
        if rt.track_generation:
            meta["generation"] = 1
        obj = self._finish(rt, body)
        self._validate(rt, obj, None)
        key = _object_key(obj)
        if key in self._objects[rt.key]:
            raise KubeError(
                409,
                f'{rt.key} "{key[1]}" already exists',
                reason="AlreadyExists",
                details=rt.details(key[1]),
            )
        if dry_run:
            return obj
        obj["metadata"]["resourceVersion"] = str(self._bump())
        self._objects[rt.key][key] = obj
        self._emit(_Change(self._rv, "ADDED", rt.key, obj, None))
        return obj

    def _existing(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        found = self._objects[rt.key].get((namespace or "", name))
        if found is None:
            raise _not_found(rt, name)
        return found

    def _take_conflict(self, rt: ResourceType, namespace: str | None, name: str) -> None:
        key = (rt.key, namespace or "", name)
        remaining = self._conflicts.get(key, 0)
        if remaining > 0:
            if remaining == 1:
                del self._conflicts[key]
            else:
                self._conflicts[key] = remaining - 1
            raise _conflict(rt, name)

    def _replace(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        subresource: str | None,
        *,
        dry_run: bool,
    ) -> tuple[int, Obj]:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request must be a JSON object")
        self._check_type_meta(rt, body)
        meta = body.get("metadata")
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be a JSON object")
        if meta.get("name") != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name', '')}) does not match the name on the"
                f" URL ({name})"
            )
        self._check_namespace(rt, meta, namespace)
        old = self._objects[rt.key].get((namespace or "", name))
        if old is None:
            if rt.allow_create_on_update and subresource is None:
                return 201, self._create(rt, namespace, body, dry_run=dry_run)
            raise _not_found(rt, name)
        self._take_conflict(rt, namespace, name)
        old_uid = old["metadata"].get("uid")
        if meta.get("uid") and meta["uid"] != old_uid:
            raise _conflict(
                rt,
                name,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta:"
                f" {old_uid}",
            )
        return 200, self._commit_update(rt, old, body, subresource, dry_run=dry_run)

    def _patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        raw: bytes,
        subresource: str | None,
        *,
        dry_run: bool,
    ) -> Obj:
        if content_type not in _PATCH_TYPES or (
            content_type == STRATEGIC_MERGE_PATCH and not rt.strategic_merge_patch
        ):
            if not rt.strategic_merge_patch:
                raise KubeError(
                    415,
                    "the body of the request was in an unknown format - accepted media types"
                    f" include: {JSON_PATCH}, {MERGE_PATCH}, application/apply-patch+yaml",
                )
            raise KubeError(
                415,
                "the body of the request was in an unknown format - accepted media types include:"
                f" {', '.join(_PATCH_TYPES)}",
            )
        old = self._existing(rt, namespace, name)
        self._take_conflict(rt, namespace, name)
        try:
            patch = json.loads(raw or b"null")
        except ValueError as exc:
            raise _bad_request(f"error decoding patch: {exc}") from None
        if content_type == JSON_PATCH:
            if not isinstance(patch, list):
                raise _bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            try:
                patched = _apply_json_patch(old, patch)
            except _PatchApplyError as exc:
                raise _rejected_patch(str(exc)) from None
        elif not isinstance(patch, dict):
            raise _bad_request("invalid JSON document: the patch must be a JSON object")
        elif content_type == MERGE_PATCH:
            # Patched results must never share containers with stored objects.
            patched = _apply_merge_patch(copy.deepcopy(old), patch)
        else:
            patched = _apply_strategic_patch(copy.deepcopy(old), patch, "", rt.list_merge_keys)
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise _rejected_patch("the patched object is not a valid object")
        self._check_type_meta(rt, patched)
        patched_name = patched["metadata"].get("name")
        if patched_name != name:
            raise _bad_request(
                f"the name of the object ({patched_name or ''}) does not match the name on the"
                f" URL ({name})"
            )
        self._check_namespace(rt, patched["metadata"], namespace)
        return self._commit_update(rt, old, patched, subresource, dry_run=dry_run)

    def _commit_update(
        self, rt: ResourceType, old: Obj, new: Obj, subresource: str | None, *, dry_run: bool
    ) -> Obj:
        meta = new["metadata"]
        old_meta = old["metadata"]
        name = old_meta["name"]
        requested_rv = meta.get("resourceVersion")
        if requested_rv in (None, ""):
            if not rt.allow_unconditional_update:
                raise _invalid(
                    rt,
                    name,
                    [
                        FieldError(
                            "metadata.resourceVersion",
                            "Invalid",
                            "must be specified for an update",
                            0,
                        )
                    ],
                )
        else:
            if not isinstance(requested_rv, str) or not requested_rv.isdigit():
                raise _invalid(
                    rt,
                    name,
                    [
                        FieldError(
                            "metadata.resourceVersion",
                            "Invalid",
                            "must be a valid unsigned integer",
                            requested_rv,
                        )
                    ],
                )
            if requested_rv != old_meta["resourceVersion"]:
                raise _conflict(rt, name)
        if rt.status_subresource:
            kept = "spec" if subresource == "status" else "status"
            if kept in old:
                new[kept] = copy.deepcopy(old[kept])
            else:
                new.pop(kept, None)
        if not meta.get("uid"):
            meta["uid"] = old_meta.get("uid")
        for server_field in _SERVER_OWNED_META:
            if server_field in old_meta:
                meta[server_field] = old_meta[server_field]
            else:
                meta.pop(server_field, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if rt.track_generation:
            generation = int(old_meta.get("generation") or 1)
            if not _json_equal(_spec_part(new), _spec_part(old)):
                generation += 1
            meta["generation"] = generation
        obj = self._finish(rt, new)
        self._validate(rt, obj, old)
        if _json_equal(obj, old):
            # etcd is not written when nothing changed: no new version, no event.
            return old
        if dry_run:
            return obj
        key = _object_key(obj)
        obj["metadata"]["resourceVersion"] = str(self._bump())
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del self._objects[rt.key][key]
            self._emit(_Change(self._rv, "DELETED", rt.key, obj, old))
            return obj
        self._objects[rt.key][key] = obj
        self._emit(_Change(self._rv, "MODIFIED", rt.key, obj, old))
        return obj

    def _remove(self, rt: ResourceType, old: Obj) -> Obj:
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        del self._objects[rt.key][_object_key(old)]
        self._emit(_Change(self._rv, "DELETED", rt.key, gone, old))
        return gone

    def _delete(
        self, rt: ResourceType, namespace: str | None, name: str, options: Obj, *, dry_run: bool
    ) -> tuple[Obj, bool]:
        """Returns (object, deleted_now); not deleted_now means finalizers are pending."""
        old = self._existing(rt, namespace, name)
        old_meta = old["metadata"]
        preconditions = options.get("preconditions") or {}
        want_uid = preconditions.get("uid")
        if want_uid and want_uid != old_meta.get("uid"):
            raise _conflict(
                rt,
                name,
                f"Precondition failed: UID in precondition: {want_uid}, UID in object meta:"
                f" {old_meta.get('uid')}",
            )
        want_rv = preconditions.get("resourceVersion")
        if want_rv and want_rv != old_meta.get("resourceVersion"):
            raise _conflict(
                rt,
                name,
                f"Precondition failed: ResourceVersion in precondition: {want_rv},"
                f" ResourceVersion in object meta: {old_meta.get('resourceVersion')}",
            )
        if old_meta.get("finalizers"):
            if old_meta.get("deletionTimestamp"):
                return old, False
            marked = copy.deepcopy(old)
            marked["metadata"]["deletionTimestamp"] = _now()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            if dry_run:
                return marked, False
            marked["metadata"]["resourceVersion"] = str(self._bump())
            self._objects[rt.key][_object_key(old)] = marked
            self._emit(_Change(self._rv, "MODIFIED", rt.key, marked, old))
            return marked, False
        if dry_run:
            return old, True
        return self._remove(rt, old), True

    def _list(self, selector: _Selector) -> Obj:
        rt = selector.rt
        items = [
            _list_item(obj)
            for _, obj in sorted(self._objects[rt.key].items())
            if selector.matches(obj)
        ]
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _watch_events(self, change: _Change, selector: _Selector) -> list[Obj]:
        if change.rt_key != selector.rt.key:
            return []
        now = selector.matches(change.obj)
        before = change.prev is not None and selector.matches(change.prev)
        if change.type in ("ADDED", "DELETED"):
            return [{"type": change.type, "object": change.obj}] if now else []
        if now and before:
            return [{"type": "MODIFIED", "object": change.obj}]
        if now:
            return [{"type": "ADDED", "object": change.obj}]
        if before and change.prev is not None:
            # Leaving the selection is reported as a deletion of the old state
            # at the new version, as the watch cache does.
            gone = copy.deepcopy(change.prev)
            gone["metadata"]["resourceVersion"] = str(change.rv)
            return [{"type": "DELETED", "object": gone}]
        return []

    def _watch_start(self, selector: _Selector, since: str | None) -> tuple[list[Obj], int]:
        """Returns initial events and the cursor; raises KubeError for ERROR events."""
        if since is None or since in ("", "0"):
            events = [
                {"type": "ADDED", "object": obj}
                for _, obj in sorted(self._objects[selector.rt.key].items())
                if selector.matches(obj)
            ]
            return events, self._rv
        if not since.isdigit():
            raise _bad_request(f'invalid resource version "{since}"')
        cursor = int(since)
        if cursor < self._history_floor:
            raise KubeError(
                410, f"too old resource version: {cursor} ({self._history_floor})", reason="Expired"
            )
        if cursor > self._rv:
            raise KubeError(
                504,
                f"Too large resource version: {cursor}, current: {self._rv}",
                reason="Timeout",
                details={
                    "causes": [
                        {
                            "reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version",
                        }
                    ],
                    "retryAfterSeconds": 1,
                },
            )
        return [], cursor

    def _watch_next(
        self, selector: _Selector, cursor: int, deadline: float
    ) -> tuple[list[Obj], int, bool]:
        """Wait (bounded) for changes after ``cursor``; returns (events, cursor, finished)."""
        with self._changed:
            for attempt in range(2):
                if cursor < self._history_floor:
                    raise KubeError(
                        410,
                        f"too old resource version: {cursor} ({self._history_floor})",
                        reason="Expired",
                    )
                pending: list[_Change] = []
                for change in reversed(self._history):
                    if change.rv <= cursor:
                        break
                    pending.append(change)
                if pending:
                    pending.reverse()
                    events = [e for c in pending for e in self._watch_events(c, selector)]
                    return events, pending[-1].rv, False
                remaining = deadline - time.monotonic()
                if self._stopping or remaining <= 0:
                    return [], cursor, True
                if attempt == 0:
                    # Short slices let the caller notice a vanished client.
                    self._changed.wait(min(remaining, _WAIT_SLICE))
            return [], cursor, False

    def _watch_closed(self) -> None:
        with self._changed:
            self._watchers -= 1
            self._changed.notify_all()

    def _record(self, method: str, path: str, content_type: str | None) -> None:
        with self._lock:
            self._requests.append(RecordedRequest(method, path, content_type))

    def _take_failure(self, method: str) -> None:
        with self._lock:
            chosen = next((f for f in self._failures if f[1] is None or f[1] == method), None)
            if chosen is None:
                return
            self._failures.remove(chosen)
            status = chosen[0]
        headers = {"Retry-After": "1"} if status == 429 else None
        details = {"retryAfterSeconds": 1} if status == 429 else None
        message = (
            "Internal error occurred: injected failure"
            if status == 500
            else f"injected failure with status {status}"
        )
        raise KubeError(status, message, details=details, headers=headers)

    def _route(self, path: str) -> tuple[ResourceType, str | None, str | None, str | None]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _path_not_found()
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not 1 <= len(rest) <= 3:
            raise _path_not_found()
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        rt = next(
            (
                r
                for r in self._resources.values()
                if (r.group, r.version, r.plural) == (group, version, plural)
            ),
            None,
        )
        if rt is None:
            raise _path_not_found()
        if namespace is not None and not rt.namespaced:
            raise _path_not_found()
        if rt.namespaced and namespace is None and name is not None:
            raise _path_not_found()
        if subresource is not None and not (subresource == "status" and rt.status_subresource):
            raise _path_not_found()
        return rt, namespace, name, subresource


def _path_not_found() -> KubeError:
    return KubeError(404, "the server could not find the requested resource", details={})


def _method_not_allowed() -> KubeError:
    return KubeError(
        405, "the server does not allow this method on the requested resource", details={}
    )


_TRUE_VALUES = frozenset({"1", "t", "T", "true", "TRUE", "True"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # Bounds idle keep-alive reads; stop() unblocks them sooner.
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ----------------------------------------------------------------- plumbing

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        return self.rfile.read(int(length))

    def _send_json(self, code: int, payload: Obj, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _write_event(self, event: Obj) -> None:
        self._write_chunk(json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n")

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
            return peeked == b""
        except (OSError, ValueError):
            return True

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        content_type = self.headers.get("Content-Type")
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        fake._record(method, split.path, content_type)
        try:
            try:
                self._authenticate()
                fake._take_failure(method)
                self._handle(method, split.path, query, content_type, body)
            except KubeError as exc:
                self._send_json(exc.code, exc.status(), exc.headers)
            except Exception:
                # The apiserver recovers from handler panics with a 500; the
                # traceback is kept so tests can fail on bugs in the fake.
                _logger.exception("unexpected failure handling %s %s", method, split.path)
                fake._record_error(traceback.format_exc())
                failure = KubeError(500, "Internal error occurred: unexpected failure in the fake")
                self._send_json(500, failure.status())
        except OSError:
            self.close_connection = True

    def _authenticate(self) -> None:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise KubeError(401, "Unauthorized")

    def _handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        content_type: str | None,
        body: bytes,
    ) -> None:
        fake = self.server.fake
        if path == "/version" and method == "GET":
            self._send_json(
                200,
                {
                    "major": "1",
                    "minor": "34",
                    "gitVersion": "v1.34.0-fakekube",
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean",
                    "buildDate": "2025-01-01T00:00:00Z",
                    "goVersion": "go1.24",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                },
            )
            return
        rt, namespace, name, subresource = fake._route(path)
        dry_run = self._dry_run(query)
        if method in ("POST", "PUT") and content_type is not None:
            media = content_type.split(";")[0].strip().lower()
            if media not in ("application/json", ""):
                raise KubeError(
                    415,
                    "the body of the request was in an unknown format - accepted media types"
                    " include: application/json",
                )
        if name is None:
            self._handle_collection(method, rt, namespace, query, body, dry_run)
            return
        if method == "GET":
            with fake._lock:
                obj = fake._existing(rt, namespace, name)
                payload = json.loads(json.dumps(obj))
            self._send_json(200, payload)
        elif method == "PUT":
            parsed = self._parse_body(body)
            with fake._changed:
                code, obj = fake._replace(rt, namespace, name, parsed, subresource, dry_run=dry_run)
                payload = json.loads(json.dumps(obj))
            self._send_json(code, payload)
        elif method == "PATCH":
            media = (content_type or "").split(";")[0].strip().lower()
            with fake._changed:
                obj = fake._patch(rt, namespace, name, media, body, subresource, dry_run=dry_run)
                payload = json.loads(json.dumps(obj))
            self._send_json(200, payload)
        elif method == "DELETE" and subresource is None:
            options = self._parse_body(body) if body.strip() else {}
            if not isinstance(options, dict):
                raise _bad_request("the body of the request must be a DeleteOptions object")
            with fake._changed:
                obj, deleted = fake._delete(rt, namespace, name, options, dry_run=dry_run)
                payload = json.loads(json.dumps(obj))
            if deleted:
                payload = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": rt.details(name, uid=obj["metadata"].get("uid")),
                }
            self._send_json(200, payload)
        else:
            raise _method_not_allowed()

    def _handle_collection(
        self,
        method: str,
        rt: ResourceType,
        namespace: str | None,
        query: Mapping[str, str],
        body: bytes,
        dry_run: bool,
    ) -> None:
        fake = self.server.fake
        if method == "GET":
            selector = self._selector(rt, namespace, query)
            if query.get("watch", "false") in _TRUE_VALUES:
                self._serve_watch(selector, query)
                return
            with fake._lock:
                payload = json.loads(json.dumps(fake._list(selector)))
            self._send_json(200, payload)
        elif method == "POST" and (namespace is not None or not rt.namespaced):
            parsed = self._parse_body(body)
            with fake._changed:
                obj = fake._create(rt, namespace, parsed, dry_run=dry_run)
                payload = json.loads(json.dumps(obj))
            self._send_json(201, payload)
        elif method == "DELETE" and (namespace is not None or not rt.namespaced):
            selector = self._selector(rt, namespace, query)
            options = self._parse_body(body) if body.strip() else {}
            if not isinstance(options, dict):
                raise _bad_request("the body of the request must be a DeleteOptions object")
            with fake._changed:
                targets = [
                    obj for _, obj in sorted(fake._objects[rt.key].items()) if selector.matches(obj)
                ]
                deleted = [
                    _list_item(
                        fake._delete(
                            rt,
                            obj["metadata"].get("namespace"),
                            obj["metadata"]["name"],
                            options,
                            dry_run=dry_run,
                        )[0]
                    )
                    for obj in targets
                ]
                payload = json.loads(
                    json.dumps(
                        {
                            "kind": f"{rt.kind}List",
                            "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(fake._rv)},
                            "items": deleted,
                        }
                    )
                )
            self._send_json(200, payload)
        else:
            raise _method_not_allowed()

    @staticmethod
    def _parse_body(body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise _bad_request(f"the request body is not valid JSON: {exc}") from None

    @staticmethod
    def _dry_run(query: Mapping[str, str]) -> bool:
        value = query.get("dryRun")
        if value is None:
            return False
        if value != "All":
            raise _bad_request(f'Invalid dry run argument: "{value}"; valid values are: "All"')
        return True

    @staticmethod
    def _selector(rt: ResourceType, namespace: str | None, query: Mapping[str, str]) -> _Selector:
        return _Selector(
            rt=rt,
            namespace=namespace,
            labels=_parse_label_selector(query.get("labelSelector", "")),
            fields=_parse_field_selector(rt, query.get("fieldSelector", "")),
        )

    def _serve_watch(self, selector: _Selector, query: Mapping[str, str]) -> None:
        fake = self.server.fake
        timeout_text = query.get("timeoutSeconds")
        if timeout_text is not None and not re.fullmatch(r"\d+", timeout_text):
            raise _bad_request(f'invalid timeoutSeconds "{timeout_text}"')
        timeout = float(timeout_text) if timeout_text else fake._default_watch_timeout
        deadline = time.monotonic() + timeout
        error: KubeError | None = None
        with fake._changed:
            if fake._stopping:
                raise KubeError(503, "the server is shutting down")
            try:
                initial, cursor = fake._watch_start(selector, query.get("resourceVersion"))
            except KubeError as exc:
                # A bad version string is a request error; an expired or
                # future one is reported inside a 200 stream, like the apiserver.
                if exc.code == 400:
                    raise
                error, initial, cursor = exc, [], 0
            initial_payload = json.loads(json.dumps(initial))
            # Counted under the same lock as the stopping check, so stop()
            # always waits for this stream to finish.
            fake._watchers += 1
            fake._changed.notify_all()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in initial_payload:
                self._write_event(event)
            while error is None:
                try:
                    events, cursor, finished = fake._watch_next(selector, cursor, deadline)
                except KubeError as exc:
                    error = exc
                    break
                with fake._lock:
                    payload = json.loads(json.dumps(events))
                for event in payload:
                    self._write_event(event)
                if finished:
                    break
                if self._peer_closed():
                    self.close_connection = True
                    return
            if error is not None:
                self._write_event({"type": "ERROR", "object": error.status()})
            self._write_chunk(b"")
        except OSError:
            self.close_connection = True
        finally:
            fake._watch_closed()
