"""The chaos suite's machinery: generated datasets and their origins, a cluster of real
coordinator and agent processes, and the monitor that proves nothing corrupt is exposed and
nothing good is lost.

- `Sizes`: how big the dataset is (one large file read as several ranges plus many small
  files); `DATACACHE_CHAOS_LONG=1` picks larger sizes.
- `Origin`: where a dataset's objects live (an S3 bucket or a directory served as file:// or
  NFS). It remembers the SHA-256 of every version of every object it was ever given, so a file
  in a cache can be judged byte for byte, and checks at the end that nothing stored was lost.
- `ChaosCluster`: a `LocalCluster` with agents started from an explicit argument list (so a
  scenario controls each agent's endpoint, wrapper such as `faketime` or `ip netns exec`, and
  flags), and the gRPC helpers the scenarios share.
- `Monitor`: a thread that walks every published `current` of every agent several times a
  second while faults are injected, and records every file that is partial, corrupt, not a
  regular file or not in the source (exposures), and every verified copy that disappeared while
  the coordinator still wanted it (lost copies).
- `NodeLabelWatch`: every label change of every Node of a Kubernetes API server, from a watch
  stream (no change is missed, unlike polling; a stream that ends early is an error).

Every wait is bounded; every thread and process is stopped by its owner's `close()`/`stop()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.exceptions
import grpc
from google.protobuf import field_mask_pb2

from datacache.localcluster import (
    DEMO_CREDENTIALS,
    ClusterError,
    LocalCluster,
    Process,
    free_port,
    s3_client,
)
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.chaos.report import LONG_ENV, ScenarioRecord

MiB = 1 << 20
BIG_KEY = "big.bin"
NAMESPACE = "default"
LABEL_PREFIX = "dataset.datacache.io/"
_WATCH_SECONDS = 1800
"""How long a NodeLabelWatch asks the API server to keep its stream open: longer than any
scenario."""


# Sizes and content ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    big_bytes: int
    """The large file, read as ranges of `part_bytes`."""
    small_files: int
    small_max_bytes: int
    many_keys: int
    """Keys of the huge-listing scenario."""
    part_bytes: int = MiB
    long: bool = False

    @classmethod
    def from_env(cls) -> Sizes:
        if os.environ.get(LONG_ENV) == "1":
            return cls(
                big_bytes=96 * MiB + 4321,
                small_files=1500,
                small_max_bytes=64_000,
                many_keys=300_000,
                long=True,
            )
        return cls(
            big_bytes=5 * MiB + 4321, small_files=60, small_max_bytes=20_000, many_keys=100_000
        )

    @property
    def ranges(self) -> int:
        return -(-self.big_bytes // self.part_bytes)

    def describe(self) -> str:
        return (
            f"one {self.big_bytes / MiB:.1f} MiB file read as {self.ranges} ranges of "
            f"{self.part_bytes // MiB} MiB, {self.small_files} small files of 1 B to "
            f"{self.small_max_bytes // 1000} kB; huge listing {self.many_keys:,} keys"
        )

    def agent_flags(self) -> tuple[str, ...]:
        """Transfer flags: the large file is read as several ranges."""
        return (
            f"--part-bytes={self.part_bytes}",
            f"--multipart-threshold-bytes={self.part_bytes}",
            "--concurrency=4",
        )


def generate(seed: int, sizes: Sizes) -> dict[str, bytes]:
    """A dataset: `big.bin` plus small files spread over a few directories."""
    rng = random.Random(seed)
    files = {BIG_KEY: rng.randbytes(sizes.big_bytes)}
    for i in range(sizes.small_files):
        files[f"small/d{i % 7}/f{i:05d}.bin"] = rng.randbytes(rng.randint(1, sizes.small_max_bytes))
    return files


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Origin:
    """A dataset's source. Subclasses store the bytes; this class remembers every version."""

    uri: str

    def __init__(self) -> None:
        self.known: dict[str, set[str]] = {}
        """SHA-256 of every version ever stored, by key."""
        self.current: dict[str, str] = {}
        """SHA-256 of what the origin holds now, by key."""
        self.unsafe: set[str] = set()
        """Keys put on purpose that the agent must refuse (never copied)."""
        self._lock = threading.Lock()

    def _store(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _load(self, key: str) -> bytes | None:
        raise NotImplementedError

    def remember(self, key: str, data: bytes, unsafe: bool = False) -> None:
        """Records that the origin holds `data` under `key` (without writing it)."""
        digest = sha256(data)
        with self._lock:
            self.known.setdefault(key, set()).add(digest)
            self.current[key] = digest
            if unsafe:
                self.unsafe.add(key)

    def put(self, key: str, data: bytes, unsafe: bool = False) -> None:
        """Stores one object; its digest is known *before* the write, so a copy racing the
        write is judged against both versions."""
        self.remember(key, data, unsafe)
        self._store(key, data)

    def put_all(self, files: Mapping[str, bytes], unsafe: Iterable[str] = ()) -> None:
        hostile = set(unsafe)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: self.put(kv[0], kv[1], kv[0] in hostile), files.items()))

    def judge(self, key: str, digest: str) -> str | None:
        """None if `digest` is a version of `key` the origin held; otherwise what is wrong."""
        with self._lock:
            versions = self.known.get(key)
            if versions is None or key in self.unsafe:
                return "not an object of the source"
            if digest not in versions:
                return "bytes match no version of the object"
        return None

    def expected_keys(self) -> set[str]:
        with self._lock:
            return set(self.current) - self.unsafe

    def lost_objects(self) -> list[str]:
        """Keys whose stored bytes are no longer what was last put (missing or changed)."""
        with self._lock:
            current = dict(self.current)
        lost = []
        for key, digest in sorted(current.items()):
            data = self._load(key)
            if data is None or sha256(data) != digest:
                lost.append(key)
        return lost


class S3Origin(Origin):
    def __init__(self, endpoint: str, bucket: str, prefix: str = "ds/") -> None:
        super().__init__()
        self.client = s3_client(endpoint)
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"

    def _store(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def _load(self, key: str) -> bytes | None:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)[
                "Body"
            ].read()
        except botocore.exceptions.ClientError:
            return None
        return body


class DirOrigin(Origin):
    """A directory read as file:// (or exported over NFS: pass the nfs:// URI)."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        super().__init__()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.uri = uri or f"file://{root}/"

    def _store(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_bytes(data)
        temp.rename(path)

    def _load(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except OSError:
            return None


# The cluster -----------------------------------------------------------------------------------


def console(name: str) -> str:
    """A console script of this installation."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed: pip install -e . from the repository")
    return found


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> float:
    """Polls `condition` (a gRPC error counts as not yet) until it holds; returns the seconds
    waited. Raises ClusterError naming `what` after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def dataset_name(short: str) -> str:
    return f"{NAMESPACE}/{short}"


def label_key(short: str) -> str:
    return f"{LABEL_PREFIX}{NAMESPACE}.{short}"


class ChaosCluster:
    """A coordinator and agent processes around a `LocalCluster`."""

    def __init__(self, local: LocalCluster, sizes: Sizes) -> None:
        self.local = local
        self.sizes = sizes
        self.nodes: list[str] = []

    # Processes ---------------------------------------------------------------------------------

    def start_coordinator(self, *flags: str, env: dict[str, str] | None = None) -> str:
        return self.local.start_coordinator("--reconcile-interval-seconds=0.5", *flags, env=env)

    def agent_argv(self, node: str, *extra: str, coordinator: str | None = None) -> list[str]:
        local = self.local
        return [
            console("datacache-agent"),
            "run",
            f"--node-name={node}",
            f"--coordinator={coordinator or local.coordinator_address}",
            f"--cache-dir={local.cache_dir(node)}",
            f"--s3-endpoint-url={local.s3_endpoint or 'http://127.0.0.1:9'}",
            f"--metrics-port={local.agent_metrics_ports.setdefault(node, free_port())}",
            "--metrics-address=127.0.0.1",
            f"--health-port={local.agent_health_ports.setdefault(node, free_port())}",
            "--health-address=127.0.0.1",
            "--log-format=json",
            "--report-interval-seconds=1",
            "--retry-base-seconds=1",
            *self.sizes.agent_flags(),
            *extra,
        ]

    def start_agent(
        self,
        node: str,
        *extra: str,
        wrapper: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        coordinator: str | None = None,
    ) -> Process:
        """Starts (or restarts) `node`'s agent; later flags override earlier ones."""
        argv = [*wrapper, *self.agent_argv(node, *extra, coordinator=coordinator)]
        process = self.local.spawn(f"agent-{node}", argv, env={**DEMO_CREDENTIALS, **(env or {})})
        self.local.agents[node] = process
        if node not in self.nodes:
            self.nodes.append(node)
        return process

    def kill_agent(self, node: str) -> None:
        self.local.agents[node].kill()

    def wait_registered(self, nodes: Iterable[str], timeout: float = 30) -> None:
        want = set(nodes)
        wait_for(
            lambda: {n.name for n in self.local.list_nodes() if n.agent_connected} >= want,
            timeout,
            f"agents {sorted(want)} to register",
        )

    def cache(self, node: str) -> Path:
        return self.local.cache_dir(node)

    def dataset_dir(self, node: str, short: str) -> Path:
        return self.cache(node) / "datasets" / NAMESPACE / short

    # API ---------------------------------------------------------------------------------------

    def create(self, short: str, source: str, replicas: int, **fields: Any) -> None:
        with self.local.channel() as channel:
            pb_grpc.DatasetServiceStub(channel).CreateDataset(
                pb.CreateDatasetRequest(
                    dataset=pb.Dataset(name=short, source=source, replicas=replicas, **fields)
                ),
                timeout=10,
            )

    def update_replicas(self, short: str, replicas: int) -> None:
        with self.local.channel() as channel:
            pb_grpc.DatasetServiceStub(channel).UpdateDataset(
                pb.UpdateDatasetRequest(
                    dataset=pb.Dataset(name=short, replicas=replicas),
                    update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
                ),
                timeout=10,
            )

    def refresh(self, short: str) -> None:
        with self.local.channel() as channel:
            pb_grpc.DatasetServiceStub(channel).RefreshDataset(
                pb.RefreshDatasetRequest(name=short), timeout=10
            )

    def dataset(self, short: str) -> pb.Dataset | None:
        """The dataset, or None once it is gone."""
        try:
            return self.local.get_dataset(short)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def replicas(self, short: str) -> dict[str, pb.Replica]:
        found = self.dataset(short)
        return {} if found is None else {r.node_name: r for r in found.status.replicas}

    def ready(self, short: str) -> set[str]:
        return {n for n, r in self.replicas(short).items() if r.state == pb.REPLICA_STATE_READY}

    def labelled(self, short: str) -> set[str]:
        """Nodes carrying the dataset's label in the coordinator's store (local mode)."""
        key = label_key(short)
        return {n.name for n in self.local.list_nodes() if n.labels.get(key) == "ready"}

    def wait_ready(self, short: str, count: int, timeout: float = 90) -> float:
        """Waits for `count` Ready replicas, labelled; returns the seconds waited."""
        return wait_for(
            lambda: len(self.ready(short)) == count and self.labelled(short) == self.ready(short),
            timeout,
            f"{count} Ready, labelled replicas of {short}",
        )

    def agent_metric(self, node: str, name: str, **labels: str) -> float:
        """The sum of a metric's samples on `node`'s agent matching `labels`."""
        port = self.local.agent_metrics_ports[node]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
            if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
                total += float(value)
        return total

    def agent_log(self, node: str) -> list[dict[str, Any]]:
        """`node`'s agent's JSON log records (every process it ever ran)."""
        path = self.local.workdir / f"agent-{node}.log"
        records = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


# The monitor -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelChange:
    seconds: float
    node: str
    key: str
    value: str | None
    """None: removed."""


@dataclass(frozen=True)
class Exposure:
    node: str
    dataset: str
    version: str
    path: str
    kind: str
    seconds: float
    """When first seen, seconds into the scenario."""

    def __str__(self) -> str:
        return f"{self.node}: {self.dataset}@{self.version}/{self.path}: {self.kind}"


@dataclass
class _Copy:
    version: str
    complete: bool


@dataclass
class _PendingVanish:
    node: str
    short: str
    version: str
    seen: float
    due: float
    attempts: int = 0


@dataclass
class Vanished:
    node: str
    dataset: str
    version: str
    seconds: float
    verdict: str
    """'wanted elsewhere' (the coordinator no longer assigned it there) or 'lost'."""


_MANIFEST_MISSING = "published version has no readable manifest"
_MISSING = "file of the manifest missing from the published version"


class Monitor:
    """Walks every agent's published versions of the watched datasets, continuously.

    A copy is *complete* when `current` names a version whose manifest lists exactly the
    files under it and every one of them holds bytes the origin held for that key. A complete
    copy that disappears is checked with the coordinator a little later: if the node is still
    assigned the dataset, the copy was lost (it has to be fetched again)."""

    def __init__(
        self,
        chaos: ChaosCluster,
        origins: Mapping[str, Origin],
        interval: float = 0.2,
        recheck_seconds: float = 3.0,
    ) -> None:
        self._chaos = chaos
        self._origins = dict(origins)
        """Short dataset name -> origin."""
        self._interval = interval
        self._recheck = recheck_seconds
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._digests: dict[tuple[int, int, int, int, int], str] = {}
        self._copies: dict[tuple[str, str], _Copy] = {}
        self._pending: list[_PendingVanish] = []
        self.exposures: dict[tuple[str, str, str, str], Exposure] = {}
        self.vanished: list[Vanished] = []
        self.excused: set[tuple[str, str, str]] = set()
        """(node, short dataset name, path): files damaged on purpose by the scenario."""
        self.passes = 0
        self.failure: BaseException | None = None
        self.label_changes: list[LabelChange] = []
        """Changes of datacache labels in the coordinator's store (local mode), as polled."""
        self._labels: dict[str, dict[str, str]] | None = None

    def watch(self, short: str, origin: Origin) -> None:
        with self._lock:
            self._origins[short] = origin

    def excuse(self, node: str, short: str, path: str) -> None:
        with self._lock:
            self.excused.add((node, short, path))

    # Thread ----------------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="chaos-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            if self._thread.is_alive():
                raise RuntimeError("the chaos monitor did not stop")
            self._thread = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.check()
                self._stop.wait(self._interval)
        except BaseException as exc:  # reported by `finish`: the scenario must not pass
            self.failure = exc

    # One pass ----------------------------------------------------------------------------------

    def check(self) -> None:
        """One pass over every node's copies, then the due verdicts on vanished copies."""
        with self._lock:
            origins = dict(self._origins)
        for node in list(self._chaos.nodes):
            for short, origin in origins.items():
                self._check_copy(node, short, origin)
        self._decide(final=False)
        self._poll_labels()
        self.passes += 1

    def _poll_labels(self) -> None:
        try:
            nodes = self._chaos.local.list_nodes()
        except grpc.RpcError:
            return  # the coordinator is down: its labels cannot change meanwhile
        now = {
            n.name: {k: v for k, v in n.labels.items() if k.startswith(LABEL_PREFIX)} for n in nodes
        }
        if self._labels is not None:
            for node in sorted(self._labels.keys() | now.keys()):
                before, after = self._labels.get(node, {}), now.get(node, {})
                for key in sorted(before.keys() | after.keys()):
                    if before.get(key) != after.get(key):
                        self.label_changes.append(
                            LabelChange(self._now(), node, key, after.get(key))
                        )
        self._labels = now

    def label_removals(self, short: str) -> list[LabelChange]:
        key = label_key(short)
        return [c for c in self.label_changes if c.key == key and c.value is None]

    def _now(self) -> float:
        return time.monotonic() - self._started

    def _expose(self, node: str, short: str, version: str, path: str, kind: str) -> None:
        key = (node, short, version, path)
        if key not in self.exposures:
            self.exposures[key] = Exposure(node, short, version, path, kind, self._now())

    def _digest(self, path: Path, st: os.stat_result) -> str | None:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._digests.get(key)
        if cached is not None:
            return cached
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            digest = hashlib.sha256()
            while block := os.read(fd, MiB):
                digest.update(block)
        finally:
            os.close(fd)
        value = digest.hexdigest()
        self._digests[key] = value
        return value

    def _check_copy(self, node: str, short: str, origin: Origin) -> None:
        directory = self._chaos.dataset_dir(node, short)
        current = directory / "current"
        if os.path.islink(directory) or os.path.islink(directory.parent):
            if os.path.lexists(current):
                self._expose(node, short, "", "", "published through a link out of the cache")
            return
        try:
            version = os.readlink(current)
        except OSError:
            self._gone(node, short)
            return
        if "/" in version or version in ("", ".", ".."):
            self._expose(node, short, version, "", "`current` points outside the dataset")
            return
        version_dir = directory / version
        findings: list[tuple[str, str]] = []
        listed: set[str] | None = None
        try:
            manifest = json.loads((directory / f"{version}.json").read_text())
            listed = {f["path"] for f in manifest["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            findings.append(("", _MANIFEST_MISSING))
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(version_dir):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath) / name
                relative = path.relative_to(version_dir).as_posix()
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if os.path.islink(path):
                    findings.append((relative, "a symbolic link"))
                    continue
                if name in dirnames:
                    continue
                if not os.path.isfile(path):
                    findings.append((relative, "not a regular file"))
                    continue
                seen.add(relative)
                digest = self._digest(path, st)
                if digest is None:
                    continue
                problem = origin.judge(relative, digest)
                if problem is not None:
                    findings.append((relative, problem))
        if listed is not None:
            findings += [(p, _MISSING) for p in sorted(listed - seen)]
            findings += [(p, "file not in the version's manifest") for p in sorted(seen - listed)]
        # Findings count only if the version was still the published one after the walk: a
        # version being replaced or deleted loses files after `current` moved away from it.
        try:
            still = os.readlink(current) == version
        except OSError:
            still = False
        if not still:
            return
        with self._lock:  # read after the walk: damage is excused before it is done
            excused = set(self.excused)
        real = [(p, k) for p, k in findings if (node, short, p) not in excused]
        for relative, kind in real:
            self._expose(node, short, version, relative, kind)
        self._copies[(node, short)] = _Copy(version, complete=not findings)

    def _gone(self, node: str, short: str) -> None:
        previous = self._copies.pop((node, short), None)
        if previous is not None and previous.complete:
            now = self._now()
            self._pending.append(
                _PendingVanish(node, short, previous.version, now, now + self._recheck)
            )

    def _decide(self, final: bool) -> None:
        """Gives a verdict on each vanished copy once its re-check is due."""
        now = self._now()
        for pending in list(self._pending):
            if pending.due > now and not final:
                continue
            try:
                replicas = self._chaos.replicas(pending.short)
            except grpc.RpcError:
                # The coordinator is down (a scenario killed it): ask again later.
                pending.attempts += 1
                if pending.attempts < 20 and not final:
                    pending.due = now + 1.0
                    continue
                replicas = {}
            row = replicas.get(pending.node)
            wanted = row is not None and row.state != pb.REPLICA_STATE_EVICTING
            verdict = "lost" if wanted else "wanted elsewhere"
            self.vanished.append(
                Vanished(pending.node, pending.short, pending.version, pending.seen, verdict)
            )
            self._pending.remove(pending)

    # Results ---------------------------------------------------------------------------------

    def complete_copies(self, short: str) -> set[str]:
        """Nodes whose published copy was complete and verified at the last pass."""
        return {
            node for (node, name), copy in self._copies.items() if name == short and copy.complete
        }

    def lost_copies(self) -> list[Vanished]:
        return [v for v in self.vanished if v.verdict == "lost"]

    def finish(self, record: ScenarioRecord) -> None:
        """Stops, makes a last pass, gives every pending verdict, and fills the record's
        figures (exposed, lost copies; `origin_lost` adds to lost)."""
        self.stop()
        self.check()
        self._decide(final=True)
        if self.failure is not None:
            raise RuntimeError("the chaos monitor failed") from self.failure
        record.exposed = len(self.exposures)
        lost = self.lost_copies()
        with self._lock:
            origins = dict(self._origins)
        origin_lost = {short: origin.lost_objects() for short, origin in origins.items()}
        record.lost = len(lost) + sum(len(v) for v in origin_lost.values())
        record.checks = self.passes
        for exposure in list(self.exposures.values())[:10]:
            record.observe(f"EXPOSED {exposure}")
        for vanished in lost:
            record.observe(
                f"LOST {vanished.node}: {vanished.dataset}@{vanished.version} removed at "
                f"{vanished.seconds:.1f}s while still assigned"
            )
        for short, keys in origin_lost.items():
            for key in keys[:10]:
                record.observe(f"LOST origin object {short}:{key}")
        elsewhere = [v for v in self.vanished if v.verdict != "lost"]
        if elsewhere:
            record.observe(
                f"{len(elsewhere)} verified copies removed because the coordinator no longer "
                "wanted them there: "
                + ", ".join(f"{v.node} ({v.dataset}) at {v.seconds:.1f}s" for v in elsewhere)
            )


# Node labels on the Kubernetes API ----------------------------------------------------------------


@dataclass
class NodeLabelWatch:
    """Streams `GET /api/v1/nodes?watch=true` from a Kubernetes API server and records every
    change of a datacache label (`dataset.datacache.io/...`) on every Node. The stream must last
    until `stop()`: if the server ends it or sends an ERROR event, changes may have been missed,
    and `error` says so."""

    server: str
    """`https://host:port` (or `http://` for a proxy)."""
    context: ssl.SSLContext | None = None
    """For https: trusts the cluster CA and presents a client certificate allowed to watch."""
    changes: list[LabelChange] = field(default_factory=list)
    uids: dict[str, set[str]] = field(default_factory=dict)
    _labels: dict[str, dict[str, str]] = field(default_factory=dict)
    _conn: http.client.HTTPConnection | None = None
    _thread: threading.Thread | None = None
    _started: float = field(default_factory=time.monotonic)
    _stopping: bool = False
    error: BaseException | None = None

    def start(self) -> NodeLabelWatch:
        split = urllib.parse.urlsplit(self.server)
        host, port = split.hostname or "127.0.0.1", split.port
        if split.scheme == "https":
            self._conn = http.client.HTTPSConnection(host, port, timeout=600, context=self.context)
        else:
            self._conn = http.client.HTTPConnection(host, port, timeout=600)
        self._conn.request(
            "GET",
            f"/api/v1/nodes?watch=true&timeoutSeconds={_WATCH_SECONDS}",
            headers={"Accept": "application/json"},
        )
        response = self._conn.getresponse()
        if response.status != 200:
            raise ClusterError(f"node watch answered {response.status}: {response.read()[:300]!r}")
        self._thread = threading.Thread(
            target=self._read, args=(response,), name="chaos-node-watch", daemon=True
        )
        self._thread.start()
        return self

    def _read(self, response: http.client.HTTPResponse) -> None:
        try:
            while line := response.readline():
                event = json.loads(line)
                obj = event.get("object", {})
                if event.get("type") == "ERROR":
                    raise ClusterError(f"the node watch failed: {obj.get('message', obj)}")
                meta = obj.get("metadata", {})
                name = meta.get("name", "")
                if event.get("type") == "DELETED":
                    labels: dict[str, str] = {}
                else:
                    labels = {
                        k: v
                        for k, v in (meta.get("labels") or {}).items()
                        if k.startswith(LABEL_PREFIX)
                    }
                    self.uids.setdefault(name, set()).add(meta.get("uid", ""))
                before = self._labels.get(name, {})
                now = time.monotonic() - self._started
                for key in sorted(before.keys() | labels.keys()):
                    if before.get(key) != labels.get(key):
                        self.changes.append(LabelChange(now, name, key, labels.get(key)))
                self._labels[name] = labels
            if not self._stopping:
                raise ClusterError("the API server ended the node watch early")
        except Exception as exc:  # the stream's end when stopping; otherwise a test failure
            if not self._stopping:
                self.error = exc

    def removals(self, key: str, nodes: Iterable[str] | None = None) -> list[LabelChange]:
        chosen = None if nodes is None else set(nodes)
        return [
            c
            for c in self.changes
            if c.key == key and c.value is None and (chosen is None or c.node in chosen)
        ]

    def stop(self) -> None:
        self._stopping = True
        if self._conn is not None and self._conn.sock is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(10)
            if self._thread.is_alive():
                raise RuntimeError("the node watch did not stop")
        if self._conn is not None:
            self._conn.close()


def scenario_seconds(record: ScenarioRecord) -> float:
    return time.monotonic() - record.started
