"""Dataset controller: keeps `datacache.io/v1alpha1` Dataset custom resources and the
coordinator's datasets in sync, through the coordinator's public gRPC API only (it is just
another client, so it works the same against a local or a remote coordinator).

- spec -> coordinator: CR `ns/name` is dataset `ns/name`. A new CR gets the finalizer
  `datacache.io/dataset`, then CreateDataset; a changed spec becomes UpdateDataset with the
  mask of the differing fields; `refreshPolicy.interval` becomes RefreshDataset when due. The CR
  is the source of truth for the datasets it owns: a change made to such a dataset through the
  API is reverted. Datasets created through the API without a CR are never touched.
- deletion: a CR being deleted gets DeleteDataset; its finalizer is removed only once
  GetDataset answers NOT_FOUND (labels removed, copies deleted), so deletion is ordered.
- coordinator -> status: GetDataset after every change, written to the status subresource with
  the CR's resourceVersion (409: re-read and retry, bounded). WatchDatasets wakes the controller
  when a dataset changes; a periodic resync covers a coordinator without it.

Threads: a CR list+watch (resourceVersion resume, 410 re-list), a WatchDatasets stream, and one
worker draining a de-duplicating, delayed work queue, so each CR is handled by one thread at a
time. The translation itself is pure (`coordinator.k8s_dataset_sync`).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from coordinator.k8s_backoff import Backoff, BackoffSettings
from coordinator.k8s_dataset_sync import (
    FINALIZER,
    GROUP,
    PLURAL,
    VERSION,
    SpecError,
    dataset_name,
    desired_dataset,
    refresh_due_in,
    rfc3339,
    same_status,
    status_of,
    update_mask,
)
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_GONE = 410
_RETRY_LATER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


@dataclass(frozen=True)
class DatasetControllerSettings:
    """How the Dataset controller watches and retries."""

    namespace: str | None = None
    """Watch Dataset CRs in this namespace only; None: every namespace (ClusterRole)."""
    resync_seconds: float = 30.0
    """Every CR is reconciled at least this often, seconds."""
    deletion_poll_seconds: float = 2.0
    """While a dataset is being deleted, check for its end this often, seconds."""
    watch_timeout_seconds: int = 300
    """Server-side length of one CR watch request, seconds."""
    grpc_timeout_seconds: float = 15.0
    """Deadline of one coordinator call, seconds."""
    status_attempts: int = 5
    """Status writes answered 409 Conflict are retried up to this many times."""
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    """Delays after failed watches and failed reconciles."""


class WorkQueue:
    """Keys to reconcile, each at most once, at the earliest time asked for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._closed = False

    def add(self, key: str, delay: float = 0.0) -> None:
        with self._cond:
            due = self._clock() + max(0.0, delay)
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, key))
            self._cond.notify()

    def get(self) -> str | None:
        """The next due key, waiting as needed; None once closed."""
        with self._cond:
            while not self._closed:
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier due time
                if self._heap:
                    due, key = self._heap[0]
                    wait = due - self._clock()
                    if wait <= 0:
                        heapq.heappop(self._heap)
                        del self._due[key]
                        return key
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class DatasetController:
    """`start()` runs the threads; `stop()` ends and joins them."""

    def __init__(
        self,
        custom_api: Any,
        channel: grpc.Channel,
        settings: DatasetControllerSettings | None = None,
    ) -> None:
        """`custom_api` is a `kubernetes.client.CustomObjectsApi`; `channel` reaches the
        coordinator's DatasetService (see `datacache.client.sync_channel`)."""
        self._api = custom_api
        self._stub = pb_grpc.DatasetServiceStub(channel)
        self._settings = settings or DatasetControllerSettings()
        self._queue = WorkQueue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._cr_watch: Any = None
        # The CR watch resumes from here, also after a watch cut mid-stream (a dropped
        # connection, an API server restart); None: list first.
        self._cr_version: str | None = None
        self._dataset_stream: Any = None
        self._failures: dict[str, Backoff] = {}
        self._threads: list[threading.Thread] = []
        self.reconciles = 0
        """Reconcile passes done; for tests and metrics."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for target, name in (
            (self._watch_crs, "dataset-cr-watch"),
            (self._watch_datasets, "dataset-grpc-watch"),
            (self._work, "dataset-controller"),
            (self._resync, "dataset-resync"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._queue.close()
        with self._lock:
            if self._cr_watch is not None:
                self._cr_watch.stop()
            if self._dataset_stream is not None:
                self._dataset_stream.cancel()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"dataset controller threads did not stop: {alive}")

    def enqueue(self, key: str, delay: float = 0.0) -> None:
        """Reconcile CR `namespace/name` (after `delay` seconds)."""
        self._queue.add(key, delay)

    # ------------------------------------------------------------------ CR watch

    def _list_call(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self._settings.namespace:
            return self._api.list_namespaced_custom_object, (
                GROUP,
                VERSION,
                self._settings.namespace,
                PLURAL,
            )
        return self._api.list_cluster_custom_object, (GROUP, VERSION, PLURAL)

    def _watch_crs(self) -> None:
        backoff = Backoff(self._settings.backoff)
        list_func, args = self._list_call()
        while not self._stopping.is_set():
            try:
                if self._cr_version is None:
                    listed = list_func(*args)
                    keys = {_key(item) for item in listed.get("items") or []}
                    with self._lock:
                        self._known = keys
                    for key in keys:
                        self.enqueue(key)
                    self._cr_version = str(listed["metadata"]["resourceVersion"])
                self._stream_crs(list_func, args, self._cr_version)
                backoff.reset()
            except ApiException as exc:
                if exc.status == _GONE:
                    log.info("Dataset CR watch expired (410); listing again")
                    self._cr_version = None
                    continue
                delay = backoff.next_delay()
                log.warning("Dataset CR watch failed (%s); retrying in %.1fs", exc.status, delay)
                self._stopping.wait(delay)
            except Exception as exc:
                if self._stopping.is_set():
                    # stop() cut the connection under the watch: not a failure.
                    return
                delay = backoff.next_delay()
                log.warning("Dataset CR watch failed (%r); retrying in %.1fs", exc, delay)
                self._stopping.wait(delay)

    def _stream_crs(
        self, list_func: Callable[..., Any], args: tuple[Any, ...], version: str
    ) -> None:
        watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        with self._lock:
            if self._stopping.is_set():
                return
            self._cr_watch = watcher
        try:
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                list_func,
                *args,
                resource_version=version,
                timeout_seconds=self._settings.watch_timeout_seconds,
            ):
                obj = event.get("raw_object") or {}
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                self._cr_version = version
                if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
                    continue
                key = _key(obj)
                with self._lock:
                    if event["type"] == "DELETED":
                        self._known.discard(key)
                    else:
                        self._known.add(key)
                if event["type"] != "DELETED":
                    self.enqueue(key)
        finally:
            with self._lock:
                self._cr_watch = None

    # ------------------------------------------------------------------ coordinator watch

    def _watch_datasets(self) -> None:
        backoff = Backoff(self._settings.backoff)
        version = 0
        while not self._stopping.is_set():
            call: Any = self._stub.WatchDatasets(pb.WatchDatasetsRequest(resource_version=version))
            with self._lock:
                if self._stopping.is_set():
                    call.cancel()
                    return
                self._dataset_stream = call
            try:
                for event in call:
                    backoff.reset()
                    version = event.resource_version or event.dataset.resource_version or version
                    if event.type == pb.WatchDatasetsResponse.EVENT_TYPE_BOOKMARK:
                        continue
                    with self._lock:
                        known = event.dataset.name in self._known
                    if known:
                        self.enqueue(event.dataset.name)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.CANCELLED and self._stopping.is_set():
                    return
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    # Too old to resume: start again from the full state.
                    version = 0
                    continue
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    # A coordinator without WatchDatasets: the periodic resync does the job.
                    log.info("WatchDatasets is not available; relying on periodic resync")
                    self._stopping.wait(self._settings.resync_seconds)
                    continue
                delay = backoff.next_delay()
                log.warning("WatchDatasets failed (%s); retrying in %.1fs", code, delay)
                self._stopping.wait(delay)
            finally:
                with self._lock:
                    self._dataset_stream = None

    def _resync(self) -> None:
        while not self._stopping.wait(self._settings.resync_seconds):
            with self._lock:
                keys = list(self._known)
            for key in keys:
                self.enqueue(key)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                again = self._reconcile(key)
                self._failures.pop(key, None)
            except (ApiException, grpc.RpcError, _RetryLater) as exc:
                backoff = self._failures.setdefault(key, Backoff(self._settings.backoff))
                again = backoff.next_delay()
                log.warning(
                    "Reconciling Dataset %s failed (%s); retrying in %.1fs",
                    key,
                    _describe(exc),
                    again,
                    extra={"dataset": key},
                )
            except Exception:
                log.exception("Reconciling Dataset %s failed", key, extra={"dataset": key})
                backoff = self._failures.setdefault(key, Backoff(self._settings.backoff))
                again = backoff.next_delay()
            self.reconciles += 1
            if again is not None:
                self.enqueue(key, again)

    def _reconcile(self, key: str) -> float | None:
        """One level-triggered pass over CR `key`; returns when to look again (None: on the
        next event or resync)."""
        namespace, name = key.split("/", 1)
        try:
            cr = self._api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        meta = cr["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            return self._finish_deletion(cr, finalizers) if FINALIZER in finalizers else None
        if FINALIZER not in finalizers:
            cr = self._patch_meta(cr, [*finalizers, FINALIZER])
        generation = int(meta.get("generation") or 0)
        try:
            desired = desired_dataset(namespace, name, cr.get("spec") or {})
        except SpecError as exc:
            self._write_status(cr, None, sync_error=("InvalidSpec", str(exc)))
            return None
        target = dataset_name(namespace, name)
        current = self._get(target)
        sync_error: tuple[str, str] | None = None
        try:
            if current is None:
                current = self._create(desired)
            mask = update_mask(current, desired)
            if mask:
                current = self._update(desired, mask)
        except _Rejected as exc:
            sync_error = ("Rejected", exc.message)
        refresh_at: float | None = None
        last_refresh: str | None = None
        status = cr.get("status") or {}
        interval = (cr.get("spec", {}).get("refreshPolicy") or {}).get("interval")
        now = datetime.now(UTC)
        due = refresh_due_in(
            interval, status.get("lastRefreshTime"), meta.get("creationTimestamp", ""), now
        )
        if due is not None and current is not None and sync_error is None:
            if due <= 0:
                current = self._call(
                    self._stub.RefreshDataset, pb.RefreshDatasetRequest(name=target)
                ).dataset
                last_refresh = rfc3339(now)
                log.info("Dataset refreshed on its interval", extra={"dataset": target})
                refresh_at = refresh_due_in(interval, last_refresh, "", now)
            else:
                refresh_at = due
        self._write_status(
            cr, current, sync_error=sync_error, last_refresh=last_refresh, generation=generation
        )
        return refresh_at

    def _finish_deletion(self, cr: dict[str, Any], finalizers: list[str]) -> float | None:
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        target = dataset_name(namespace, name)
        current = self._get(target)
        if current is not None:
            if current.status.phase != "Deleting":
                try:
                    self._call(self._stub.DeleteDataset, pb.DeleteDatasetRequest(name=target))
                except _Rejected as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: gone already
                        raise
                log.info("Dataset CR deleted: deleting the dataset", extra={"dataset": target})
            self._write_status(cr, current, deleting=True)
            return self._settings.deletion_poll_seconds
        self._patch_meta(cr, [f for f in finalizers if f != FINALIZER])
        log.info("Dataset deleted; finalizer removed", extra={"dataset": target})
        return None

    # ------------------------------------------------------------------ coordinator calls

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self._settings.grpc_timeout_seconds)
        except grpc.RpcError as exc:
            if exc.code() in _RETRY_LATER:
                raise
            raise _Rejected(exc.code(), exc.details() or "") from exc

    def _get(self, target: str) -> pb.Dataset | None:
        try:
            response = self._call(self._stub.GetDataset, pb.GetDatasetRequest(name=target))
        except _Rejected as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise _RetryLater(exc.message) from exc
        dataset: pb.Dataset = response.dataset
        return dataset

    def _create(self, desired: pb.Dataset) -> pb.Dataset:
        try:
            response = self._call(
                self._stub.CreateDataset, pb.CreateDatasetRequest(dataset=desired)
            )
        except _Rejected as exc:
            if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                # Created meanwhile (or deleting under the same name): look again soon.
                raise _RetryLater("dataset exists already") from exc
            raise
        log.info("Dataset created from its CR", extra={"dataset": desired.name})
        dataset: pb.Dataset = response.dataset
        return dataset

    def _update(self, desired: pb.Dataset, mask: list[str]) -> pb.Dataset:
        try:
            response = self._call(
                self._stub.UpdateDataset,
                pb.UpdateDatasetRequest(
                    dataset=desired, update_mask=field_mask_pb2.FieldMask(paths=mask)
                ),
            )
        except _Rejected as exc:
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise _RetryLater(exc.message) from exc
            raise
        log.info("Dataset updated from its CR: %s", ",".join(mask), extra={"dataset": desired.name})
        dataset: pb.Dataset = response.dataset
        return dataset

    # ------------------------------------------------------------------ CR writes

    def _patch_meta(self, cr: dict[str, Any], finalizers: list[str]) -> dict[str, Any]:
        """Sets the finalizers with a merge patch guarded by the CR's resourceVersion."""
        meta = cr["metadata"]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        patched: dict[str, Any] = self._api.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch
        )
        return patched

    def _write_status(
        self,
        cr: dict[str, Any],
        dataset: pb.Dataset | None,
        *,
        sync_error: tuple[str, str] | None = None,
        deleting: bool = False,
        last_refresh: str | None = None,
        generation: int | None = None,
    ) -> None:
        meta = cr["metadata"]
        for _attempt in range(self._settings.status_attempts):
            previous = cr.get("status") or {}
            status = status_of(
                dataset,
                previous,
                int(cr["metadata"].get("generation") or generation or 0),
                datetime.now(UTC),
                sync_error=sync_error,
                deleting=deleting,
                last_refresh=last_refresh,
            )
            if same_status(status, previous):
                return
            body = {**cr, "status": status}
            try:
                self._api.replace_namespaced_custom_object_status(
                    GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body
                )
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            cr = self._api.get_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"]
            )
        raise _RetryLater(f"status write conflicted {self._settings.status_attempts} times")


class _Rejected(Exception):
    """The coordinator refused a call for a reason retrying will not fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = f"{code.name}: {message}"


class _RetryLater(Exception):
    """A transient state; the key is retried with backoff."""


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code()}"
    return str(exc)
