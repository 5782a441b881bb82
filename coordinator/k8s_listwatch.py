"""A list-then-watch loop over one kind of Kubernetes object, in a thread.

List, then watch from the list's `resourceVersion`; a watch that ends resumes from the last
version seen; a 410 Expired re-lists (events missed meanwhile are then covered by the fresh
list); errors back off with bounded, jittered delays. Objects are handed over as the raw JSON
the API server sent, so listing and watching share one translation.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from coordinator.k8s_backoff import Backoff, BackoffSettings

log = logging.getLogger(__name__)

_GONE = 410
Obj = Mapping[str, Any]


@dataclass(frozen=True)
class ListWatchSettings:
    watch_timeout_seconds: int = 300
    """Server-side length of one watch request, seconds; bounds how long a silently dead
    connection goes unnoticed."""
    request_timeout_seconds: float = 30.0
    """Client-side timeout of a list request, seconds."""
    backoff: BackoffSettings = field(default_factory=BackoffSettings)
    """Delays between attempts after errors."""

    def __post_init__(self) -> None:
        if self.watch_timeout_seconds < 1:
            raise ValueError(
                f"watch_timeout_seconds must be at least 1, got {self.watch_timeout_seconds}"
            )


class ListWatch:
    """Calls `on_list(items)` after every (re)list and `on_event(type, obj)` for each
    ADDED/MODIFIED/DELETED event. `list_call` is a client list method (e.g.
    `CoreV1Api.list_pod_for_all_namespaces`); `list_kwargs` are passed to it (selectors)."""

    def __init__(
        self,
        what: str,
        list_call: Callable[..., Any],
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        list_kwargs: Mapping[str, Any] | None = None,
        settings: ListWatchSettings | None = None,
    ) -> None:
        self._what = what
        self._list = list_call
        self._on_list = on_list
        self._on_event = on_event
        self._kwargs = dict(list_kwargs or {})
        self._settings = settings or ListWatchSettings()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: k8s_watch.Watch | None = None
        self._thread: threading.Thread | None = None
        self.lists = 0
        """How many times the objects were (re-)listed."""
        # Kept outside the watch call so that a watch cut mid-stream (a dropped connection, an
        # API server restart) resumes after the last event it delivered, not from the list.
        self._version: str | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._what} watch already started")
        self._thread = threading.Thread(target=self._run, name=f"{self._what}-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            if self._watch is not None:
                self._watch.stop()  # type: ignore[no-untyped-call]
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._what} watch did not stop within {timeout}s")

    def _run(self) -> None:
        backoff = Backoff(self._settings.backoff)
        while not self._stopping.is_set():
            try:
                if self._version is None:
                    self._version = self._relist()
                self._watch_from(self._version)
                backoff.reset()
            except ApiException as exc:
                if exc.status == _GONE:
                    log.info("%s watch expired (410); listing again", self._what)
                    self._version = None
                    continue
                delay = backoff.next_delay()
                log.warning(
                    "%s list/watch failed (%s %s); retrying in %.1fs",
                    self._what,
                    exc.status,
                    exc.reason,
                    delay,
                )
                self._stopping.wait(delay)
            except Exception as exc:
                if self._stopping.is_set():
                    # stop() cut the connection under the watch: not a failure.
                    return
                # Connection errors and anything unexpected: the loop must outlive them.
                delay = backoff.next_delay()
                log.warning("%s list/watch failed (%r); retrying in %.1fs", self._what, exc, delay)
                self._stopping.wait(delay)

    def _relist(self) -> str:
        response = self._list(
            _preload_content=False,
            _request_timeout=self._settings.request_timeout_seconds,
            **self._kwargs,
        )
        body = json.loads(response.data)
        items = body.get("items") or []
        self._on_list(items)
        self.lists += 1
        return str((body.get("metadata") or {}).get("resourceVersion", ""))

    def _watch_from(self, version: str) -> None:
        watcher = k8s_watch.Watch()  # type: ignore[no-untyped-call]
        with self._lock:
            if self._stopping.is_set():
                return
            self._watch = watcher
        try:
            for event in watcher.stream(  # type: ignore[no-untyped-call]
                self._list,
                resource_version=version,
                timeout_seconds=self._settings.watch_timeout_seconds,
                allow_watch_bookmarks=True,
                **self._kwargs,
            ):
                obj = event.get("raw_object") or {}
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(str(kind), obj)
                # Once handled: a handler that raises sees the event again.
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                self._version = version
        finally:
            with self._lock:
                self._watch = None
