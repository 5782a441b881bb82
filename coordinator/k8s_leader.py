"""Leader election on a `coordination.k8s.io/v1` Lease.

The protocol step is the official client's: `kubernetes.leaderelection`'s
`LeaderElection.try_acquire_or_renew` with its `LeaseLock` (read the Lease; create it if
absent; take it over only when its holder has not renewed for a full lease duration as
observed on *our* clock, so clock skew between nodes does not matter; write it back with
`replace`, whose `resourceVersion` makes every write a compare-and-swap: of two candidates
racing for an expired Lease one gets 409 and stays a follower).

The loops around it are ours, because the official `LeaderElection.run()` cannot be used in a
server: it never returns while following and cannot be stopped, it calls `sys.exit` on a bad
configuration, it runs only one term (no re-election after losing the Lease), it never releases
the Lease on shutdown (the next coordinator then waits a full lease duration) and its
`LeaseLock` talks to the process-wide default client configuration rather than a given one.

Behaviour of the coordinator as a follower: it stays
alive and Ready (readiness never depends on leadership, so a rolling restart or a partitioned
old pod cannot make the Service empty), serves gRPC health and metrics, and answers every
DatasetService and AgentService call with UNAVAILABLE "not the leader": the caller retries and,
through the Service, reaches the leader. It does not run the reconciler, write Node objects or
the store until `on_started_leading`; after `on_stopped_leading` it stops doing so at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

log = logging.getLogger(__name__)
# The official client logs every successful renewal at INFO (one line per retry period for as
# long as a coordinator leads); this module logs each acquisition, loss and release itself.
logging.getLogger("leaderelection").setLevel(logging.WARNING)

# The official client's jitter factor: renew_deadline must exceed retry_period times this.
_JITTER = 1.2


class LeaderElectionError(Exception):
    """The leader election settings cannot work; the message says which and how to fix it."""


@dataclass(frozen=True)
class LeaderElectionSettings:
    """Timing of the election, with the Kubernetes controller defaults."""

    lease_duration_seconds: int = 15
    """How long a follower waits, after it last saw the Lease change, before taking it over,
    seconds (whole seconds: the Lease stores an integer). Bounds failover time."""
    renew_deadline_seconds: float = 10.0
    """How long the leader keeps trying to renew before it steps down, seconds. Must be less
    than the lease duration, so a leader always steps down before anyone can take over."""
    retry_period_seconds: float = 2.0
    """Time between two attempts to acquire or renew, seconds (at least 1)."""
    release_on_stop: bool = True
    """On a clean stop, give the Lease up so a successor need not wait a lease duration."""

    def __post_init__(self) -> None:
        if self.retry_period_seconds < 1:
            raise LeaderElectionError(
                f"retry period must be at least 1s, got {self.retry_period_seconds}"
            )
        if self.renew_deadline_seconds <= _JITTER * self.retry_period_seconds:
            raise LeaderElectionError(
                f"renew deadline ({self.renew_deadline_seconds}s) must exceed {_JITTER} times "
                f"the retry period ({self.retry_period_seconds}s): raise it or lower the period"
            )
        if self.lease_duration_seconds <= self.renew_deadline_seconds:
            raise LeaderElectionError(
                f"lease duration ({self.lease_duration_seconds}s) must exceed the renew deadline "
                f"({self.renew_deadline_seconds}s), or two leaders could overlap"
            )


class LeaderElection:
    """Campaigns for Lease `namespace/name` as `identity` (the pod name) from a thread.

    `run_in_thread(on_started_leading, on_stopped_leading)` starts it; the callbacks run in
    the election thread and must return quickly (hand the news to the event loop). After
    losing the Lease it campaigns again. `is_leader` is also false once the last successful
    renewal is older than the renew deadline, even if the thread is stuck in a slow request.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        settings: LeaderElectionSettings | None = None,
    ) -> None:
        """`api_client` is a `kubernetes.client.ApiClient`."""
        if not identity:
            raise LeaderElectionError(
                "leader election needs a non-empty identity: set POD_NAME from the downward API"
            )
        self.settings = settings or LeaderElectionSettings()
        self.identity = identity
        lock = LeaseLock(name, namespace, identity)  # type: ignore[no-untyped-call]
        lock.api_instance = k8s.CoordinationV1Api(api_client)
        self._lock = lock
        self._elector = leaderelection.LeaderElection(  # type: ignore[no-untyped-call]
            electionconfig.Config(  # type: ignore[no-untyped-call]
                lock=lock,
                lease_duration=self.settings.lease_duration_seconds,
                renew_deadline=self.settings.renew_deadline_seconds,
                retry_period=self.settings.retry_period_seconds,
                onstarted_leading=lambda: None,
                onstopped_leading=lambda: None,
            )
        )
        self._stopping = threading.Event()
        self._state = threading.Lock()
        self._renewed_at: float | None = None
        self._thread: threading.Thread | None = None
        self._release = self.settings.release_on_stop
        self.terms = 0
        """How many times this candidate became leader."""

    @property
    def is_leader(self) -> bool:
        with self._state:
            renewed = self._renewed_at
        return (
            renewed is not None
            and time.monotonic() - renewed < self.settings.renew_deadline_seconds
        )

    def run_in_thread(
        self,
        on_started_leading: Callable[[], None],
        on_stopped_leading: Callable[[], None],
    ) -> threading.Thread:
        if self._thread is not None:
            raise RuntimeError("leader election already running")
        self._thread = threading.Thread(
            target=self._run,
            args=(on_started_leading, on_stopped_leading),
            name="leader-election",
            daemon=True,
        )
        self._thread.start()
        return self._thread

    def stop(self, *, release: bool | None = None, timeout: float = 30.0) -> None:
        """Stops campaigning; a leader steps down (calling `on_stopped_leading`) and, with
        `release` (default: the setting), gives the Lease up."""
        self._release = self.settings.release_on_stop if release is None else release
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"leader election did not stop within {timeout}s")

    # ------------------------------------------------------------------ loop

    def _attempt(self) -> bool:
        try:
            return bool(self._elector.try_acquire_or_renew())  # type: ignore[no-untyped-call]
        except Exception as exc:
            # Connection errors escape the official lock (it catches ApiException only).
            log.warning("Lease %s: acquire/renew attempt failed: %r", self._lock.name, exc)
            return False

    def _wait(self, seconds: float) -> bool:
        """Waits with the official jitter; True when stopping."""
        return self._stopping.wait(seconds * random.uniform(1.0, _JITTER))  # noqa: S311

    def _run(
        self, on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None]
    ) -> None:
        retry = self.settings.retry_period_seconds
        while not self._stopping.is_set():
            if not self._attempt():
                self._wait(retry)
                continue
            with self._state:
                self._renewed_at = time.monotonic()
            self.terms += 1
            log.info("Lease %s acquired by %s: leading", self._lock.name, self.identity)
            _call(on_started_leading, "on_started_leading")
            self._lead()
            with self._state:
                self._renewed_at = None
            log.info("Lease %s: %s stopped leading", self._lock.name, self.identity)
            _call(on_stopped_leading, "on_stopped_leading")
            if self._stopping.is_set() and self._release:
                self._give_up()

    def _lead(self) -> None:
        """Renews until stopping or until the renew deadline passes without a renewal."""
        while not self._wait(self.settings.retry_period_seconds):
            if self._attempt():
                with self._state:
                    self._renewed_at = time.monotonic()
            elif not self.is_leader:
                log.warning(
                    "Lease %s not renewed for %.0fs: stepping down",
                    self._lock.name,
                    self.settings.renew_deadline_seconds,
                )
                return

    def _give_up(self) -> None:
        """Writes an empty holder. The lock's last read predates our last renewal (a renewal
        is a read, then a write that bumps the resourceVersion), so the Lease is read again
        first: the write is a compare-and-swap on that version, and it is made only while we
        still hold the Lease, so a successor that took it meanwhile is never overwritten."""
        name, namespace = self._lock.name, self._lock.namespace
        try:
            found, current = self._lock.get(name, namespace)  # type: ignore[no-untyped-call]
            if not found or getattr(current, "holder_identity", None) != self.identity:
                log.info("Lease %s: held by someone else by now; nothing to release", name)
                return
            now = str(datetime.now(UTC).astimezone().replace(tzinfo=None))
            record = LeaderElectionRecord(  # type: ignore[no-untyped-call]
                "", "1", getattr(current, "acquire_time", None) or now, now
            )
            released = self._lock.update(name, namespace, record)  # type: ignore[no-untyped-call]
        except Exception as exc:
            released = False
            log.warning("Lease %s: release failed: %r", name, exc)
        if released:
            log.info("Lease %s released by %s", name, self.identity)
        else:
            log.warning(
                "Lease %s: release refused; a successor takes over after the lease duration", name
            )


def _call(callback: Callable[[], None], what: str) -> None:
    try:
        callback()
    except Exception:
        log.exception("Leader election callback %s failed", what)
