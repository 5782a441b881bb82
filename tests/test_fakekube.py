"""Drives `tests.fakekube.FakeKubeAPI` over real HTTP with the official client."""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.fakekube import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, ZONE_LABEL, FakeKubeAPI

# pytest-timeout bounds a test as a whole when present; every individual wait
# below is bounded on its own regardless.
pytestmark = pytest.mark.timeout(60)

# (connect, read) seconds for every client call; watches below use shorter
# server-side timeouts, so a read never legitimately takes this long.
CLIENT_TIMEOUT = (5.0, 20.0)
WAIT = 5.0
T = TypeVar("T")


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI()
    try:
        yield server
    finally:
        server.stop()
    assert server.server_errors == []


def new_api_client(fake: FakeKubeAPI, kubeconfig: Path) -> client.ApiClient:
    fake.write_kubeconfig(kubeconfig)
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    request: Callable[..., Any] = api.rest_client.request

    def bounded(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("_request_timeout"):
            kwargs["_request_timeout"] = CLIENT_TIMEOUT
        return request(*args, **kwargs)

    api.rest_client.request = bounded  # type: ignore[method-assign]
    return api


def new_watch() -> Any:
    return watch.Watch()  # type: ignore[no-untyped-call]


@pytest.fixture
def api_client(fake: FakeKubeAPI, tmp_path: Path) -> Iterator[client.ApiClient]:
    api = new_api_client(fake, tmp_path / "kubeconfig")
    try:
        yield api
    finally:
        api.close()  # type: ignore[no-untyped-call]


# The API objects are typed Any, as in coordinator/k8s_labeler.py: every field
# of the generated models is Optional, and narrowing each access would bury
# the assertions.
@pytest.fixture
def v1(api_client: client.ApiClient) -> Any:
    """A `kubernetes.client.CoreV1Api`."""
    return client.CoreV1Api(api_client)


@pytest.fixture
def coordination(api_client: client.ApiClient) -> Any:
    """A `kubernetes.client.CoordinationV1Api`."""
    return client.CoordinationV1Api(api_client)


def api_error(call: Callable[[], object]) -> ApiException:
    with pytest.raises(ApiException) as info:
        call()
    return info.value


def status_body(error: ApiException) -> dict[str, Any]:
    assert error.body is not None
    body: dict[str, Any] = json.loads(error.body)
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["code"] == error.status
    return body


def node_labels(v1: Any, name: str) -> dict[str, str]:
    labels: dict[str, str] | None = v1.read_node(name).metadata.labels
    return dict(labels or {})


def stream_events(
    v1: Any, count: int, timeout_seconds: int = 5, **kwargs: Any
) -> list[dict[str, Any]]:
    """Collect up to ``count`` node watch events; the server ends the stream in time."""
    events: list[dict[str, Any]] = []
    w = new_watch()
    for event in w.stream(v1.list_node, timeout_seconds=timeout_seconds, **kwargs):
        events.append(event)
        if len(events) == count:
            w.stop()
    return events


# --------------------------------------------------------------------------- basics


def test_kubeconfig_points_at_plain_http_with_token(fake: FakeKubeAPI, tmp_path: Path) -> None:
    path = fake.write_kubeconfig(tmp_path / "config")
    document = json.loads(path.read_text())
    assert document["clusters"][0]["cluster"]["server"] == fake.url
    assert fake.url.startswith("http://127.0.0.1:")
    assert document["users"][0]["user"]["token"]


def test_requests_without_token_are_unauthorized(fake: FakeKubeAPI) -> None:
    host, port = fake.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        connection.request("GET", "/api/v1/nodes")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 401
    assert body["reason"] == "Unauthorized"
    assert body["code"] == 401


def test_unknown_paths_are_not_found(v1: Any) -> None:
    error = api_error(lambda: v1.list_namespaced_pod("default"))
    assert error.status == 404
    assert status_body(error)["message"] == "the server could not find the requested resource"


def test_create_get_list_nodes(fake: FakeKubeAPI, v1: Any) -> None:
    before = int(fake.resource_version)
    created = v1.create_node(
        client.V1Node(metadata=client.V1ObjectMeta(name="node-a", labels={"role": "cache"}))
    )
    assert created.kind == "Node"
    assert created.api_version == "v1"
    assert created.metadata.uid
    assert created.metadata.creation_timestamp is not None
    assert int(created.metadata.resource_version) > before

    fetched = v1.read_node("node-a")
    assert fetched.metadata.uid == created.metadata.uid
    assert fetched.metadata.resource_version == created.metadata.resource_version
    assert fetched.metadata.labels == {"role": "cache"}

    fake.add_node("node-b")
    listing = v1.list_node()
    assert [n.metadata.name for n in listing.items] == ["node-a", "node-b"]
    assert listing.metadata.resource_version == fake.resource_version
    assert int(listing.items[1].metadata.resource_version) > int(created.metadata.resource_version)

    duplicate = api_error(
        lambda: v1.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="node-a")))
    )
    assert duplicate.status == 409
    body = status_body(duplicate)
    assert body["reason"] == "AlreadyExists"
    assert body["details"] == {"name": "node-a", "kind": "nodes"}


def test_list_items_omit_type_meta_like_the_apiserver(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("node-a")
    response = v1.list_node(_preload_content=False)
    document = json.loads(response.data)
    assert document["kind"] == "NodeList"
    assert "kind" not in document["items"][0]
    assert "apiVersion" not in document["items"][0]


def test_invalid_label_is_rejected_with_422(v1: Any) -> None:
    error = api_error(
        lambda: v1.create_node(
            client.V1Node(metadata=client.V1ObjectMeta(name="n", labels={"bad key": "v"}))
        )
    )
    assert error.status == 422
    body = status_body(error)
    assert body["reason"] == "Invalid"
    assert body["details"]["kind"] == "Node"
    assert body["details"]["causes"][0]["field"] == "metadata.labels"


def test_label_and_field_selectors(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("a", labels={"tier": "hot", "dataset.datacache.io/foo": "ready"})
    fake.add_node("b", labels={"tier": "cold"})
    fake.add_node("c", unschedulable=True)

    def names(**kwargs: str) -> list[str]:
        return [n.metadata.name for n in v1.list_node(**kwargs).items]

    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="tier=hot") == ["a"]
    assert names(label_selector="tier==hot") == ["a"]
    assert names(label_selector="tier!=hot") == ["b", "c"]
    assert names(label_selector="!tier") == ["c"]
    assert names(label_selector="tier in (hot,cold)") == ["a", "b"]
    assert names(label_selector="tier notin (hot)") == ["b", "c"]
    assert names(label_selector="tier,dataset.datacache.io/foo=ready") == ["a"]
    assert names(label_selector=f"{ZONE_LABEL}") == []
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    assert names(field_selector="spec.unschedulable=true") == ["c"]
    assert names(label_selector="tier", field_selector="metadata.name=a") == ["a"]

    bad_label = api_error(lambda: v1.list_node(label_selector="tier in hot"))
    assert bad_label.status == 400
    bad_field = api_error(lambda: v1.list_node(field_selector="spec.nodeName=x"))
    assert bad_field.status == 400
    assert status_body(bad_field)["message"] == "field label not supported: spec.nodeName"


def test_generate_name_and_url_name_mismatch(v1: Any) -> None:
    created = v1.create_node(client.V1Node(metadata=client.V1ObjectMeta(generate_name="cache-")))
    name = created.metadata.name
    assert name.startswith("cache-")
    assert len(name) == len("cache-") + 5
    node = v1.read_node(name)
    node.metadata.name = "other"
    error = api_error(lambda: v1.replace_node(name, node))
    assert error.status == 400
    assert status_body(error)["reason"] == "BadRequest"


def test_delete_collection_by_label(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("a", labels={"pool": "x"})
    fake.add_node("b", labels={"pool": "x"})
    fake.add_node("c")
    v1.delete_collection_node(label_selector="pool=x")
    assert [n.metadata.name for n in v1.list_node().items] == ["c"]


# --------------------------------------------------------------------------- patches


def test_client_sends_strategic_merge_for_dicts_and_json_patch_for_lists(
    fake: FakeKubeAPI, v1: Any
) -> None:
    fake.add_node("n")
    fake.clear_requests()
    v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}})
    v1.patch_node("n", [{"op": "add", "path": "/metadata/labels/b", "value": "2"}])
    patches = [r for r in fake.requests if r.method == "PATCH"]
    assert [r.content_type for r in patches] == [STRATEGIC_MERGE_PATCH, JSON_PATCH]
    assert patches[0].path == "/api/v1/nodes/n"


def test_strategic_merge_patch_of_labels_merges(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", labels={"keep": "yes", "drop": "me"})
    v1.patch_node("n", {"metadata": {"labels": {"added": "1", "drop": None}}})
    assert node_labels(v1, "n") == {"keep": "yes", "added": "1"}


def test_merge_patch_adds_and_none_removes_label(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", labels={"keep": "yes"})
    v1.patch_node(
        "n", {"metadata": {"labels": {"dataset.datacache.io/foo": "1"}}}, _content_type=MERGE_PATCH
    )
    assert node_labels(v1, "n") == {"keep": "yes", "dataset.datacache.io/foo": "1"}
    v1.patch_node(
        "n", {"metadata": {"labels": {"dataset.datacache.io/foo": None}}}, _content_type=MERGE_PATCH
    )
    assert node_labels(v1, "n") == {"keep": "yes"}
    v1.patch_node("n", {"metadata": {"labels": {"keep": None}}}, _content_type=MERGE_PATCH)
    # The apiserver omits empty maps, so clients see None rather than {}.
    assert v1.read_node("n").metadata.labels is None


def test_strategic_merge_patch_merges_lists_with_merge_keys(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", taints=[{"key": "a", "effect": "NoSchedule"}])
    v1.patch_node_status(
        "n",
        {"status": {"conditions": [{"type": "DiskPressure", "status": "False"}]}},
    )
    conditions = {c.type: c.status for c in v1.read_node("n").status.conditions}
    assert conditions == {"Ready": "True", "DiskPressure": "False"}

    v1.patch_node("n", {"spec": {"taints": [{"key": "b", "effect": "NoExecute"}]}})
    taints = v1.read_node("n").spec.taints
    assert [(t.key, t.effect) for t in taints] == [("b", "NoExecute")]

    v1.patch_node_status(
        "n", {"status": {"conditions": [{"type": "DiskPressure", "$patch": "delete"}]}}
    )
    assert [c.type for c in v1.read_node("n").status.conditions] == ["Ready"]


def test_json_patch_with_escaped_label_keys(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", labels={"keep": "yes"})
    path = "/metadata/labels/dataset.datacache.io~1foo"
    v1.patch_node("n", [{"op": "add", "path": path, "value": "pending"}])
    assert node_labels(v1, "n")["dataset.datacache.io/foo"] == "pending"

    v1.patch_node(
        "n",
        [
            {"op": "test", "path": path, "value": "pending"},
            {"op": "replace", "path": path, "value": "ready"},
            {"op": "add", "path": "/metadata/annotations", "value": {"x.io/a": "1"}},
            {"op": "copy", "from": "/metadata/annotations/x.io~1a", "path": "/metadata/labels/b"},
        ],
    )
    node = v1.read_node("n")
    assert node.metadata.labels == {"keep": "yes", "dataset.datacache.io/foo": "ready", "b": "1"}
    assert node.metadata.annotations == {"x.io/a": "1"}

    # "~0" decodes to "~", which no label key may contain: the apiserver's
    # validation names the decoded key.
    tilde = api_error(
        lambda: v1.patch_node("n", [{"op": "add", "path": "/metadata/labels/a~0b", "value": "x"}])
    )
    assert tilde.status == 422
    assert '"a~b"' in status_body(tilde)["message"]

    v1.patch_node(
        "n", [{"op": "remove", "path": path}, {"op": "remove", "path": "/metadata/labels/b"}]
    )
    assert node_labels(v1, "n") == {"keep": "yes"}


def test_json_patch_failures_answer_422_and_change_nothing(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", labels={"state": "a"})
    version = v1.read_node("n").metadata.resource_version
    failed_test = api_error(
        lambda: v1.patch_node(
            "n",
            [
                {"op": "replace", "path": "/metadata/labels/state", "value": "b"},
                {"op": "test", "path": "/metadata/labels/state", "value": "a"},
            ],
        )
    )
    assert failed_test.status == 422
    body = status_body(failed_test)
    assert body["reason"] == "Invalid"
    assert body["message"] == "the server rejected our request due to an error in our request"

    missing = api_error(
        lambda: v1.patch_node("n", [{"op": "remove", "path": "/metadata/labels/nope"}])
    )
    assert missing.status == 422

    node = v1.read_node("n")
    assert node.metadata.labels == {"state": "a"}
    assert node.metadata.resource_version == version


def test_unchanged_patch_does_not_bump_resource_version(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", labels={"a": "1"})
    version = fake.resource_version
    patched = v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}})
    assert patched.metadata.resource_version == version
    assert fake.resource_version == version


def test_resource_version_compare_and_swap(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    stale = v1.read_node("n")
    v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}})
    current = v1.read_node("n")

    def stale_patch(content_type: str) -> Callable[[], object]:
        body = {"metadata": {"resourceVersion": stale.metadata.resource_version, "labels": {}}}
        return lambda: v1.patch_node("n", body, _content_type=content_type)

    for content_type in (STRATEGIC_MERGE_PATCH, MERGE_PATCH):
        conflict = api_error(stale_patch(content_type))
        assert conflict.status == 409
        body = status_body(conflict)
        assert body["reason"] == "Conflict"
        assert body["message"].startswith('Operation cannot be fulfilled on nodes "n"')

    json_conflict = api_error(
        lambda: v1.patch_node(
            "n",
            [
                {
                    "op": "replace",
                    "path": "/metadata/resourceVersion",
                    "value": stale.metadata.resource_version,
                }
            ],
        )
    )
    assert json_conflict.status == 409

    swapped = v1.patch_node(
        "n",
        {"metadata": {"resourceVersion": current.metadata.resource_version, "labels": {"b": "2"}}},
    )
    assert int(swapped.metadata.resource_version) > int(current.metadata.resource_version)
    assert swapped.metadata.labels == {"a": "1", "b": "2"}

    stale.metadata.labels = {"lost": "update"}
    replace_conflict = api_error(lambda: v1.replace_node("n", stale))
    assert replace_conflict.status == 409

    # Without a resourceVersion an update is unconditional for nodes.
    stale.metadata.resource_version = None
    replaced = v1.replace_node("n", stale)
    assert replaced.metadata.labels == {"lost": "update"}


def test_replace_with_another_objects_uid_conflicts(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    old = v1.read_node("n")
    fake.recreate_node("n")
    old.metadata.resource_version = None
    error = api_error(lambda: v1.replace_node("n", old))
    assert error.status == 409
    assert "Precondition failed: UID in precondition" in status_body(error)["message"]


def test_replace_keeps_status_and_status_subresource_keeps_spec(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n", allocatable={"ephemeral-storage": "10Gi"})
    node = v1.read_node("n")
    node.spec.unschedulable = True
    node.status.allocatable = {"ephemeral-storage": "1Gi"}
    replaced = v1.replace_node("n", node)
    assert replaced.spec.unschedulable is True
    assert replaced.status.allocatable == {"ephemeral-storage": "10Gi"}

    patched = v1.patch_node_status(
        "n",
        {"spec": {"unschedulable": False}, "status": {"allocatable": {"ephemeral-storage": "5Gi"}}},
    )
    assert patched.spec.unschedulable is True
    assert patched.status.allocatable == {"ephemeral-storage": "5Gi"}


def test_injected_conflicts_make_client_retries_observable(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    fake.add_node("other")
    fake.inject_conflicts("nodes", name="n", count=2)
    fake.clear_requests()

    def label_with_retries(attempts: int) -> int:
        for attempt in range(1, attempts + 1):
            try:
                v1.patch_node("n", {"metadata": {"labels": {"x": "1"}}})
                return attempt
            except ApiException as error:
                if error.status != 409:
                    raise
        raise AssertionError("conflicts never cleared")

    # Writes to other objects are unaffected.
    v1.patch_node("other", {"metadata": {"labels": {"x": "1"}}})
    assert label_with_retries(5) == 3
    assert node_labels(v1, "n") == {"x": "1"}
    assert len([r for r in fake.requests if r.method == "PATCH"]) == 4


def test_missing_objects_answer_404(v1: Any) -> None:
    calls: list[Callable[[], object]] = [
        lambda: v1.read_node("ghost"),
        lambda: v1.delete_node("ghost"),
        lambda: v1.patch_node("ghost", {"metadata": {"labels": {"a": "1"}}}),
        lambda: v1.patch_node("ghost", [{"op": "add", "path": "/metadata/labels", "value": {}}]),
        lambda: v1.replace_node("ghost", client.V1Node(metadata=client.V1ObjectMeta(name="ghost"))),
    ]
    for call in calls:
        error = api_error(call)
        assert error.status == 404
        body = status_body(error)
        assert body["reason"] == "NotFound"
        assert body["message"] == 'nodes "ghost" not found'


def test_fail_next_returns_generic_errors(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    fake.fail_next(1)
    error = api_error(lambda: v1.read_node("n"))
    assert error.status == 500
    assert status_body(error)["reason"] == "InternalError"

    fake.fail_next(1, status=429)
    throttled = api_error(lambda: v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}}))
    assert throttled.status == 429
    assert status_body(throttled)["reason"] == "TooManyRequests"
    assert throttled.headers is not None
    assert throttled.headers["Retry-After"] == "1"
    assert v1.read_node("n").metadata.labels is None


def test_client_retries_throttled_reads_transparently(fake: FakeKubeAPI, v1: Any) -> None:
    # urllib3's default Retry honours Retry-After on 429 for idempotent
    # methods, so callers never see a throttled GET; the fake must not hide that.
    fake.add_node("n")
    fake.fail_next(1, status=429)
    fake.clear_requests()
    assert v1.read_node("n").metadata.name == "n"
    assert [r.method for r in fake.requests] == ["GET", "GET"]


def test_delete_returns_status_and_honours_preconditions(fake: FakeKubeAPI, v1: Any) -> None:
    node = fake.add_node("n")
    wrong = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="not-the-uid"))
    error = api_error(lambda: v1.delete_node("n", body=wrong))
    assert error.status == 409
    right = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(uid=node["metadata"]["uid"])
    )
    # The 37.x client declares delete_node as returning "object": a dict.
    status = v1.delete_node("n", body=right)
    assert status["kind"] == "Status"
    assert status["status"] == "Success"
    assert status["details"] == {"name": "n", "kind": "nodes", "uid": node["metadata"]["uid"]}
    assert fake.get_node("n") is None


def test_finalizers_delay_deletion_until_removed(fake: FakeKubeAPI, v1: Any) -> None:
    v1.create_node(
        client.V1Node(metadata=client.V1ObjectMeta(name="n", finalizers=["datacache.io/cleanup"]))
    )
    v1.delete_node("n")
    pending = v1.read_node("n")
    assert pending.metadata.deletion_timestamp is not None
    v1.patch_node("n", {"metadata": {"finalizers": None}}, _content_type=MERGE_PATCH)
    assert api_error(lambda: v1.read_node("n")).status == 404


def test_dry_run_does_not_persist(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    version = fake.resource_version
    v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}}, dry_run="All")
    v1.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="m")), dry_run="All")
    assert fake.resource_version == version
    assert node_labels(v1, "n") == {}
    assert fake.get_node("m") is None


# --------------------------------------------------------------------------- watch


def test_watch_replays_added_modified_deleted_after_resource_version(
    fake: FakeKubeAPI, v1: Any
) -> None:
    fake.add_node("old")
    since = v1.list_node().metadata.resource_version
    fake.add_node("n")
    v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}})
    v1.delete_node("n")

    events = stream_events(v1, 3, resource_version=since)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "n"),
        ("MODIFIED", "n"),
        ("DELETED", "n"),
    ]
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions)
    assert versions[0] > int(since)
    assert events[1]["object"].metadata.labels == {"a": "1"}
    assert events[1]["raw_object"]["kind"] == "Node"


def test_watch_without_version_starts_with_current_state(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("a")
    fake.add_node("b")
    events = stream_events(v1, 2)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


def test_watch_streams_live_changes(fake: FakeKubeAPI, v1: Any) -> None:
    since = v1.list_node().metadata.resource_version
    received: queue.Queue[dict[str, Any]] = queue.Queue()
    failures: list[Exception] = []

    def consume() -> None:
        # Watch.stop() from another thread would shut the socket under the
        # reader, so the consumer stops itself after the expected events.
        w = new_watch()
        seen = 0
        try:
            for event in w.stream(v1.list_node, resource_version=since, timeout_seconds=10):
                received.put(event)
                seen += 1
                if seen == 3:
                    w.stop()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            failures.append(error)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        assert fake.wait_for_watchers(1, timeout=WAIT)
        fake.add_node("n")
        first = received.get(timeout=WAIT)
        assert (first["type"], first["object"].metadata.name) == ("ADDED", "n")
        v1.patch_node("n", {"metadata": {"labels": {"a": "1"}}})
        second = received.get(timeout=WAIT)
        assert second["type"] == "MODIFIED"
        assert second["object"].metadata.labels == {"a": "1"}
        fake.delete_node("n")
        assert received.get(timeout=WAIT)["type"] == "DELETED"
    finally:
        consumer.join(timeout=WAIT + 10)
    assert not consumer.is_alive()
    assert failures == []


def test_watch_selector_transitions_become_added_and_deleted(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    since = fake.resource_version
    v1.patch_node("n", {"metadata": {"labels": {"cached": "yes"}}})
    v1.patch_node("n", {"metadata": {"labels": {"other": "x"}}})
    v1.patch_node("n", {"metadata": {"labels": {"cached": None}}})
    events = stream_events(v1, 3, resource_version=since, label_selector="cached=yes")
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[2]["object"].metadata.labels["cached"] == "yes"


def test_watch_timeout_ends_stream(fake: FakeKubeAPI, v1: Any) -> None:
    started = time.monotonic()
    assert stream_events(v1, 1, timeout_seconds=1, resource_version=fake.resource_version) == []
    assert 0.5 < time.monotonic() - started < WAIT


def test_watch_from_compacted_version_gets_410(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    since = v1.list_node().metadata.resource_version
    fake.add_node("m")
    fake.compact_history()
    error = api_error(lambda: stream_events(v1, 1, resource_version=since))
    assert error.status == 410


def test_watch_from_future_version_is_an_error(fake: FakeKubeAPI, v1: Any) -> None:
    future = str(int(fake.resource_version) + 100)
    assert api_error(lambda: stream_events(v1, 1, resource_version=future)).status == 504


def test_bounded_history_expires_old_versions(tmp_path: Path) -> None:
    with FakeKubeAPI(history_limit=2) as small:
        api = new_api_client(small, tmp_path / "kubeconfig")
        try:
            v1 = client.CoreV1Api(api)
            since = small.resource_version
            for name in ("a", "b", "c"):
                small.add_node(name)
            assert api_error(lambda: stream_events(v1, 1, resource_version=since)).status == 410
            recent = stream_events(v1, 1, resource_version=str(int(since) + 1))
            assert [e["object"].metadata.name for e in recent] == ["b"]
        finally:
            api.close()  # type: ignore[no-untyped-call]


def test_stop_ends_open_watch_promptly(fake: FakeKubeAPI, v1: Any) -> None:
    finished = threading.Event()
    outcome: list[Exception | None] = []

    def consume() -> None:
        try:
            for _ in new_watch().stream(
                v1.list_node, resource_version=fake.resource_version, timeout_seconds=30
            ):
                pass
            outcome.append(None)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            outcome.append(error)
        finally:
            finished.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert fake.wait_for_watchers(1, timeout=WAIT)
    started = time.monotonic()
    fake.stop()
    assert finished.wait(timeout=WAIT)
    consumer.join(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    assert fake.active_watchers == 0
    # The stream ended with its terminating chunk, not a reset connection.
    assert outcome == [None]


# --------------------------------------------------------------------------- hooks


def test_node_hooks(fake: FakeKubeAPI, v1: Any) -> None:
    added = fake.add_node(
        "n",
        labels={"a": "1"},
        annotations={"note": "x"},
        taints=[{"key": "dedicated", "value": "cache", "effect": "NoSchedule"}],
        zone="zone-1",
    )
    assert added["metadata"]["labels"] == {"a": "1", ZONE_LABEL: "zone-1"}
    assert "ephemeral-storage" in added["status"]["allocatable"]

    node = v1.read_node("n")
    assert node.metadata.labels[ZONE_LABEL] == "zone-1"
    assert node.spec.taints[0].key == "dedicated"
    assert (
        node.status.allocatable["ephemeral-storage"]
        == added["status"]["allocatable"]["ephemeral-storage"]
    )

    copy = fake.get_node("n")
    assert copy is not None
    copy["metadata"]["labels"]["mutated"] = "yes"
    assert "mutated" not in node_labels(v1, "n")

    since = fake.resource_version
    recreated = fake.recreate_node("n")
    assert recreated["metadata"]["uid"] != added["metadata"]["uid"]
    assert "labels" not in recreated["metadata"]
    assert recreated["status"]["allocatable"] == added["status"]["allocatable"]
    events = stream_events(v1, 2, resource_version=since)
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]

    fake.delete_node("n")
    assert fake.get_node("n") is None
    with pytest.raises(KeyError):
        fake.delete_node("n")


def test_capacity_defaults_allocatable(fake: FakeKubeAPI) -> None:
    node = fake.add_node("n", capacity={"ephemeral-storage": "50Gi"})
    assert node["status"]["allocatable"] == {"ephemeral-storage": "50Gi"}


# --------------------------------------------------------------------------- leases and events


def make_lease(holder: str) -> Any:
    return client.V1Lease(
        metadata=client.V1ObjectMeta(name="datacache-leader", namespace="kube-system"),
        spec=client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=15),
    )


def test_lease_create_replace_and_stale_conflict(fake: FakeKubeAPI, coordination: Any) -> None:
    created = coordination.create_namespaced_lease("kube-system", make_lease("a"))
    assert created.metadata.namespace == "kube-system"
    assert created.spec.holder_identity == "a"

    duplicate = api_error(
        lambda: coordination.create_namespaced_lease("kube-system", make_lease("b"))
    )
    assert duplicate.status == 409
    assert status_body(duplicate)["message"] == (
        'leases.coordination.k8s.io "datacache-leader" already exists'
    )

    current = coordination.read_namespaced_lease("datacache-leader", "kube-system")
    stale_version = current.metadata.resource_version
    current.spec.holder_identity = "b"
    current.spec.lease_transitions = 1
    renewed = coordination.replace_namespaced_lease("datacache-leader", "kube-system", current)
    assert renewed.spec.holder_identity == "b"
    assert int(renewed.metadata.resource_version) > int(stale_version)

    contender = make_lease("c")
    contender.metadata.resource_version = stale_version
    conflict = api_error(
        lambda: coordination.replace_namespaced_lease("datacache-leader", "kube-system", contender)
    )
    assert conflict.status == 409
    assert status_body(conflict)["details"]["group"] == "coordination.k8s.io"

    leases = coordination.list_namespaced_lease("kube-system").items
    assert [(lease.metadata.name, lease.spec.holder_identity) for lease in leases] == [
        ("datacache-leader", "b")
    ]
    assert coordination.list_namespaced_lease("default").items == []
    assert fake.get_object("leases", "datacache-leader", namespace="kube-system") is not None

    missing = api_error(lambda: coordination.read_namespaced_lease("nope", "kube-system"))
    assert missing.status == 404

    invalid = make_lease("d")
    invalid.metadata.name = "other"
    invalid.spec.lease_duration_seconds = 0
    assert (
        api_error(lambda: coordination.create_namespaced_lease("kube-system", invalid)).status
        == 422
    )


def test_lease_injected_conflict_and_watch(fake: FakeKubeAPI, coordination: Any) -> None:
    since = fake.resource_version
    coordination.create_namespaced_lease("kube-system", make_lease("a"))
    fake.inject_conflicts("leases", name="datacache-leader", namespace="kube-system")
    current = coordination.read_namespaced_lease("datacache-leader", "kube-system")
    assert (
        api_error(
            lambda: coordination.replace_namespaced_lease(
                "datacache-leader", "kube-system", current
            )
        ).status
        == 409
    )
    current.spec.holder_identity = "b"
    coordination.replace_namespaced_lease("datacache-leader", "kube-system", current)

    w = new_watch()
    events = []
    for event in w.stream(
        coordination.list_namespaced_lease,
        "kube-system",
        resource_version=since,
        timeout_seconds=5,
    ):
        events.append(event)
        if len(events) == 2:
            w.stop()
    assert [(e["type"], e["object"].spec.holder_identity) for e in events] == [
        ("ADDED", "a"),
        ("MODIFIED", "b"),
    ]


def test_events_create_and_list(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    for i, node in enumerate(("n", "m")):
        v1.create_namespaced_event(
            "default",
            client.CoreV1Event(
                metadata=client.V1ObjectMeta(name=f"evt-{i}"),
                involved_object=client.V1ObjectReference(kind="Node", name=node),
                reason="DatasetCached",
                message="cached",
                type="Normal",
            ),
        )
    in_namespace = v1.list_namespaced_event("default").items
    assert [e.metadata.name for e in in_namespace] == ["evt-0", "evt-1"]
    assert all(e.metadata.namespace == "default" for e in in_namespace)
    for_node = v1.list_namespaced_event("default", field_selector="involvedObject.name=n").items
    assert [e.metadata.name for e in for_node] == ["evt-0"]
    assert len(v1.list_event_for_all_namespaces().items) == 2
    assert v1.list_namespaced_event("other").items == []
    mismatch = api_error(
        lambda: v1.create_namespaced_event(
            "default",
            client.CoreV1Event(
                metadata=client.V1ObjectMeta(name="x", namespace="other"),
                involved_object=client.V1ObjectReference(kind="Node", name="n"),
            ),
        )
    )
    assert mismatch.status == 400


def test_event_replace_creates_missing_event(fake: FakeKubeAPI, v1: Any) -> None:
    # The Event registry allows create-on-update, unlike nodes and leases.
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="evt", namespace="default"),
        involved_object=client.V1ObjectReference(kind="Node", name="n"),
        count=1,
    )
    created = v1.replace_namespaced_event("evt", "default", event)
    assert created.metadata.uid
    created.count = 2
    assert v1.replace_namespaced_event("evt", "default", created).count == 2
    assert fake.get_object("events", "evt", namespace="default") is not None


def retry(call: Callable[[], T], attempts: int) -> T:
    """Retries 409s; used to show injected conflicts are finite."""
    for _ in range(attempts - 1):
        try:
            return call()
        except ApiException as error:
            if error.status != 409:
                raise
    return call()


def test_inject_conflicts_counts_down(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n")
    fake.inject_conflicts(name="n", count=3)
    node = retry(lambda: v1.patch_node("n", {"metadata": {"labels": {"ok": "1"}}}), attempts=4)
    assert node.metadata.labels == {"ok": "1"}


def test_secrets_fold_string_data_and_validate_base64(fake: FakeKubeAPI, v1: Any) -> None:
    created = v1.create_namespaced_secret(
        "datacache",
        {"metadata": {"name": "s3"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIA"}},
    )
    assert created.data == {"AWS_ACCESS_KEY_ID": "QUtJQQ=="}
    assert created.type == "Opaque"
    stored = fake.get_object("secrets", "s3", "datacache")
    assert stored is not None and "stringData" not in stored
    with pytest.raises(ApiException) as bad:
        v1.create_namespaced_secret(
            "datacache", {"metadata": {"name": "bad"}, "data": {"k": "not base64!"}}
        )
    assert bad.value.status == 422
    with pytest.raises(ApiException) as key:
        v1.create_namespaced_secret(
            "datacache", {"metadata": {"name": "bad"}, "stringData": {"a/b": "x"}}
        )
    assert key.value.status == 422


def test_recreate_node_with_compaction_expires_open_watches(fake: FakeKubeAPI, v1: Any) -> None:
    fake.add_node("n1")
    version = v1.list_node().metadata.resource_version
    fake.recreate_node("n1", compact=True)
    stream = new_watch().stream(v1.list_node, resource_version=version, timeout_seconds=5)
    with pytest.raises(ApiException) as gone:
        list(stream)
    assert gone.value.status == 410
