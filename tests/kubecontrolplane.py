"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager of one pinned release, built by `scripts/kube-binaries`, started on
loopback free ports with generated certificates.

The API server runs as a current cluster does: `--authorization-mode=Node,RBAC`, bound
ServiceAccount tokens signed with a key of its own, and the default admission plugins (Pod
Security, ValidatingAdmissionPolicy, the admission webhooks, ...) plus NodeRestriction. The
controller manager runs the controllers a kubelet-less cluster can use (jobs, garbage
collection, namespaces, ServiceAccounts); node lifecycle is off, since nothing heartbeats.
Nodes are Node objects made by `add_node`, Ready, with capacity, allocatable storage and a zone.

`python -m tests.kubecontrolplane` (or `scripts/kube-up`) starts one by hand and prints how to
reach it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.tlscerts import CertificateAuthority

REPO = Path(__file__).resolve().parent.parent
ZONE_LABEL = "topology.kubernetes.io/zone"
START_TIMEOUT = 120.0
"""Seconds each component gets to become healthy."""
STOP_TIMEOUT = 15.0
"""Seconds each component gets to exit after SIGTERM before SIGKILL."""
_REQUEST_TIMEOUT = 30.0
_CONTROLLERS = ",".join(
    (
        "serviceaccount-controller",
        "job-controller",
        "garbage-collector-controller",
        "namespace-controller",
        "validatingadmissionpolicy-status-controller",
    )
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or reached; the message says which part
    and where its log is."""


class KubeAPIError(RuntimeError):
    """The API server answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {message}")

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_binaries() -> Path:
    """Runs scripts/kube-binaries (a no-op when the build is cached) and returns the directory
    holding the binaries."""
    try:
        built = subprocess.run(
            [str(REPO / "scripts" / "kube-binaries")],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ControlPlaneError("scripts/kube-binaries did not finish within an hour") from exc
    if built.returncode != 0:
        raise ControlPlaneError(
            f"scripts/kube-binaries failed (exit {built.returncode}):\n{built.stderr[-4000:]}"
        )
    return Path(built.stdout.strip().splitlines()[-1])


@dataclass
class _Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def stop(self, *, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)


def _wait_healthy(component: _Component, url: str, context: ssl.SSLContext | None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not component.running():
            raise ControlPlaneError(
                f"{component.name} exited during start-up; its log ({component.log}) ends:\n"
                f"{component.tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as answer:  # noqa: S310
                if answer.status == 200:
                    return
                last = f"status {answer.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise ControlPlaneError(
        f"{component.name} was not healthy at {url} within {START_TIMEOUT:.0f}s ({last}); its "
        f"log ({component.log}) ends:\n{component.tail()}"
    )


def _kubeconfig(server: str, ca_file: Path, user: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "user", "user": dict(user)}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }


class KubeControlPlane:
    """The control plane. `start()` it (or use it as a context manager) and `stop()` it;
    `workdir` keeps certificates, kubeconfigs, etcd's data and each component's log."""

    def __init__(self, workdir: Path, binaries: Path | None = None) -> None:
        self.workdir = workdir
        self.binaries = binaries
        self.api_port = 0
        self._components: dict[str, _Component] = {}
        self.ca_file = workdir / "pki" / "ca.crt"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self._admin_cert: tuple[str, str] | None = None
        self._context: ssl.SSLContext | None = None

    # -------------------------------------------------------------------- lifecycle

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def start(self) -> KubeControlPlane:
        binaries = self.binaries or build_binaries()
        self.binaries = binaries
        for name in ("etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager"):
            if not (binaries / name).is_file():
                raise ControlPlaneError(f"{binaries / name} is missing: run scripts/kube-binaries")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start_scheduler()
            self._start_controller_manager()
            self.wait_for_service_account("default", "default")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd"):
            component = self._components.get(name)
            if component is not None:
                component.stop()

    def __enter__(self) -> KubeControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self) -> dict[str, Path]:
        return {name: c.log for name, c in self._components.items()}

    def restart_apiserver(self, *, kill: bool = False) -> None:
        """Stops kube-apiserver (SIGTERM, or SIGKILL with `kill`) and starts it again on the
        same port, with the same certificates and data; returns once it is ready."""
        component = self._components["kube-apiserver"]
        component.stop(kill=kill)
        self._wait_port_free(self.api_port)
        component.start()
        _wait_healthy(component, f"{self.server}/readyz", self._ssl_context())

    # -------------------------------------------------------------------- start-up

    def _write_pki(self) -> None:
        pki = self.workdir / "pki"
        ca = CertificateAuthority(pki, name="ca")
        self._ca = ca
        self.ca_file = ca.cert_file
        self._serving = ca.issue(
            "kube-apiserver",
            ("kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            server=True,
            file_name="apiserver",
        )
        admin = ca.issue("kubernetes-admin", organizations=("system:masters",), file_name="admin")
        self._admin_cert = (str(admin.cert_file), str(admin.key_file))
        scheduler = ca.issue("system:kube-scheduler", file_name="scheduler")
        manager = ca.issue("system:kube-controller-manager", file_name="controller-manager")
        key = ec.generate_private_key(ec.SECP256R1())
        self._sa_key = pki / "sa.key"
        self._sa_pub = pki / "sa.pub"
        self._sa_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._sa_pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.api_port = free_port()
        for path, pair in (
            (self.admin_kubeconfig, admin),
            (self.workdir / "scheduler.kubeconfig", scheduler),
            (self.workdir / "controller-manager.kubeconfig", manager),
        ):
            user = {"client-certificate": str(pair.cert_file), "client-key": str(pair.key_file)}
            path.write_text(yaml.safe_dump(_kubeconfig(self.server, self.ca_file, user)))

    def _component(self, name: str, argv: list[str]) -> _Component:
        assert self.binaries is not None
        component = _Component(
            name, [str(self.binaries / name), *argv], self.workdir / "logs" / f"{name}.log"
        )
        self._components[name] = component
        component.start()
        return component

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        component = self._component(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                # Test data: durability across a power cut is not needed, speed is.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        _wait_healthy(component, f"{self.etcd_url}/health", None)

    def _start_apiserver(self) -> None:
        self._component(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.workdir / 'pki'}",
                f"--tls-cert-file={self._serving.cert_file}",
                f"--tls-private-key-file={self._serving.key_file}",
                f"--client-ca-file={self.ca_file}",
                "--authorization-mode=Node,RBAC",
                # The defaults of the release (NamespaceLifecycle, ServiceAccount, PodSecurity,
                # ValidatingAdmissionPolicy, the admission webhooks, ResourceQuota, ...) plus
                # the one clusters add for kubelets.
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self._sa_pub}",
                f"--service-account-signing-key-file={self._sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # Endpoints may not name loopback addresses; nothing here routes to the
                # `kubernetes` Service anyway.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        _wait_healthy(
            self._components["kube-apiserver"], f"{self.server}/readyz", self._ssl_context()
        )

    def _start_scheduler(self) -> None:
        port = free_port()
        component = self._component(
            "kube-scheduler",
            [
                f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
                "--v=1",
            ],
        )
        _wait_healthy(component, f"https://127.0.0.1:{port}/healthz", _insecure())

    def _start_controller_manager(self) -> None:
        port = free_port()
        kubeconfig = self.workdir / "controller-manager.kubeconfig"
        component = self._component(
            "kube-controller-manager",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--controllers={_CONTROLLERS}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'controller-manager-certs'}",
                f"--root-ca-file={self.ca_file}",
                f"--service-account-private-key-file={self._sa_key}",
                "--use-service-account-credentials=true",
                "--v=1",
            ],
        )
        _wait_healthy(component, f"https://127.0.0.1:{port}/healthz", _insecure())

    @staticmethod
    def _wait_port_free(port: int) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    time.sleep(0.1)
                    continue
                return
        raise ControlPlaneError(f"port {port} still in use {STOP_TIMEOUT:.0f}s after stopping")

    # -------------------------------------------------------------------- REST as admin

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            if self._admin_cert is not None:
                context.load_cert_chain(*self._admin_cert)
            self._context = context
        return self._context

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
        token: str | None = None,
        server: str | None = None,
    ) -> Any:
        """One request as the cluster admin (or as the bearer of `token`); returns the decoded
        JSON answer, raises KubeAPIError on an error status."""
        import http.client

        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        split = urllib.parse.urlsplit(server or self.server)
        context = self._ssl_context() if token is None else _ca_only(self.ca_file)
        connection: http.client.HTTPConnection
        if split.scheme == "https":
            connection = http.client.HTTPSConnection(
                split.hostname or "127.0.0.1", split.port, timeout=_REQUEST_TIMEOUT, context=context
            )
        else:
            connection = http.client.HTTPConnection(
                split.hostname or "127.0.0.1", split.port, timeout=_REQUEST_TIMEOUT
            )
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        payload: bytes | None = None
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            connection.request(method, path, body=payload, headers=headers)
            answer = connection.getresponse()
            raw = answer.read()
        finally:
            connection.close()
        try:
            decoded: Any = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode(errors="replace")
        if answer.status >= 400:
            raise KubeAPIError(method, path, answer.status, decoded)
        return decoded

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def create(self, path: str, obj: Mapping[str, Any]) -> Any:
        return self.request("POST", path, dict(obj))

    def patch(self, path: str, patch: Mapping[str, Any], *, kind: str = "merge") -> Any:
        return self.request(
            "PATCH", path, dict(patch), content_type=f"application/{kind}-patch+json"
        )

    def delete(self, path: str, *, missing_ok: bool = True) -> Any:
        try:
            return self.request("DELETE", path)
        except KubeAPIError as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise

    def apply_yaml(self, text: str) -> None:
        """Creates each object of a YAML stream (replacing one that exists), as the admin."""
        for obj in yaml.safe_load_all(text):
            if obj:
                self.create_or_replace(obj)

    def create_or_replace(self, obj: Mapping[str, Any]) -> Any:
        path = resource_path(obj)
        try:
            return self.create(path, obj)
        except KubeAPIError as exc:
            if exc.status != 409:
                raise
        name = obj["metadata"]["name"]
        current = self.get(f"{path}/{name}")
        replacement = dict(obj)
        replacement["metadata"] = {
            **obj["metadata"],
            "resourceVersion": current["metadata"]["resourceVersion"],
        }
        return self.request("PUT", f"{path}/{name}", replacement)

    # -------------------------------------------------------------------- cluster objects

    def add_node(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        zone: str | None = None,
        capacity: Mapping[str, str] | None = None,
        allocatable: Mapping[str, str] | None = None,
        taints: Sequence[Mapping[str, str]] = (),
        unschedulable: bool = False,
        ready: bool = True,
    ) -> dict[str, Any]:
        """Creates a Node as a kubelet would register one: labels (hostname, OS, zone), then
        a status with capacity, allocatable and a Ready condition."""
        all_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        if zone is not None:
            all_labels[ZONE_LABEL] = zone
        spec: dict[str, Any] = {}
        if taints:
            spec["taints"] = [dict(t) for t in taints]
        if unschedulable:
            spec["unschedulable"] = True
        metadata: dict[str, Any] = {"name": name, "labels": all_labels}
        if annotations:
            metadata["annotations"] = dict(annotations)
        node = {"apiVersion": "v1", "kind": "Node", "metadata": metadata, "spec": spec}
        self.create("/api/v1/nodes", node)
        default = {
            "cpu": "8",
            "memory": "32Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }
        cap = {**default, **(capacity or {})}
        alloc = {**cap, **(allocatable or {})}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "capacity": cap,
            "allocatable": alloc,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": "KubeletReady" if ready else "KubeletNotReady",
                    "message": "test node",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
        }
        self.patch(f"/api/v1/nodes/{name}/status", {"status": status}, kind="strategic-merge")
        # The TaintNodesByCondition admission plugin taints every new Node not-ready; the node
        # lifecycle controller lifts that once the kubelet reports Ready. That controller is
        # off here (nothing heartbeats), so registration does its part: the Node keeps exactly
        # the taints asked for.
        return dict(self.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": spec.get("taints")}}))

    def get_node(self, name: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/nodes/{name}"))

    def delete_node(self, name: str) -> None:
        self.delete(f"/api/v1/nodes/{name}")

    def node_names(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.get("/api/v1/nodes")["items"]]

    def ensure_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        metadata: dict[str, Any] = {"name": name}
        if labels:
            metadata["labels"] = dict(labels)
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                current = self.get(f"/api/v1/namespaces/{name}")
            except KubeAPIError as exc:
                if exc.status != 404:
                    raise
                current = None
            if current is None or current.get("status", {}).get("phase") != "Terminating":
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"namespace {name} still terminating after cleanup")
            time.sleep(0.1)
        try:
            self.create("/api/v1/namespaces", body)
        except KubeAPIError as exc:
            if exc.status != 409:
                raise
            if labels:
                self.patch(f"/api/v1/namespaces/{name}", {"metadata": {"labels": dict(labels)}})
        self.wait_for_service_account(name, "default")

    def wait_for_service_account(self, namespace: str, name: str) -> None:
        """Waits (bounded) until a ServiceAccount exists: the controller manager makes each
        namespace's `default`, which pods need before they may be created."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
                return
            except KubeAPIError as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise ControlPlaneError(
                        f"ServiceAccount {namespace}/{name} did not appear within "
                        f"{START_TIMEOUT:.0f}s: {exc}"
                    ) from exc
            time.sleep(0.1)

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Sequence[str] = (),
        seconds: int = 3600,
        bound_pod: tuple[str, str] | None = None,
    ) -> str:
        """A bound token of ServiceAccount namespace/name from the TokenRequest API, as a
        kubelet projects one (optionally bound to pod (name, uid))."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        if bound_pod is not None:
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": bound_pod[0],
                "uid": bound_pod[1],
            }
        answer = self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])

    def write_token_kubeconfig(self, path: Path, token: str, *, server: str | None = None) -> Path:
        """A kubeconfig that authenticates with a bearer token (optionally through another
        server address, such as a fault proxy)."""
        target = server or self.server
        config = _kubeconfig(target, self.ca_file, {"token": token})
        if target.startswith("http://"):
            del config["clusters"][0]["cluster"]["certificate-authority"]
        path.write_text(yaml.safe_dump(config))
        return path

    def write_admin_kubeconfig(self, path: Path, *, server: str | None = None) -> Path:
        """The admin's client-certificate kubeconfig, pointed at `server` if given."""
        assert self._admin_cert is not None
        config = _kubeconfig(
            server or self.server,
            self.ca_file,
            {"client-certificate": self._admin_cert[0], "client-key": self._admin_cert[1]},
        )
        path.write_text(yaml.safe_dump(config))
        return path

    def write_user_kubeconfig(self, path: Path, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig with a client certificate the API server reads as `user` in `groups`
        (CN and O), such as a kubelet's system:node:<name> in system:nodes."""
        pair = self._ca.issue(user, organizations=tuple(groups), file_name=f"user-{path.stem}")
        config = _kubeconfig(
            self.server,
            self.ca_file,
            {"client-certificate": str(pair.cert_file), "client-key": str(pair.key_file)},
        )
        path.write_text(yaml.safe_dump(config))
        return path

    def admin_ssl_context(self) -> ssl.SSLContext:
        """Trusts the cluster CA and presents the admin's client certificate."""
        return self._ssl_context()


def resource_path(obj: Mapping[str, Any]) -> str:
    """The collection path of an object of a kind the tests create."""
    api_version = str(obj["apiVersion"])
    kind = str(obj["kind"])
    namespace = obj.get("metadata", {}).get("namespace")
    plural = _PLURALS.get(kind) or kind.lower() + "s"
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace and kind not in _CLUSTER_SCOPED:
        return f"{base}/namespaces/{namespace}/{plural}"
    return f"{base}/{plural}"


_PLURALS = {
    "CustomResourceDefinition": "customresourcedefinitions",
    "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    "PriorityClass": "priorityclasses",
    "NetworkPolicy": "networkpolicies",
    "Ingress": "ingresses",
    "Endpoints": "endpoints",
}
_CLUSTER_SCOPED = {
    "Namespace",
    "Node",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "CSIDriver",
}


def _insecure() -> ssl.SSLContext:
    """For health checks of the scheduler and controller manager, which serve self-signed
    certificates of their own."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _ca_only(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def token_subject(token: str) -> dict[str, Any]:
    """The claims of a ServiceAccount token (not verified: for test assertions only)."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return dict(json.loads(base64.urlsafe_b64decode(payload)))


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[KubeControlPlane]:
    plane = KubeControlPlane(workdir)
    with plane:
        yield plane


def main() -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(
        prog="scripts/kube-up",
        description="Start the test Kubernetes control plane on loopback until interrupted.",
    )
    parser.add_argument("workdir", nargs="?", help="certificates, etcd data and logs")
    parser.add_argument(
        "--nodes", type=int, default=0, help="register node-1..node-N (Ready, zones a and b)"
    )
    parser.add_argument(
        "--apply-manifests", action="store_true", help="kubectl apply --server-side -k manifests/"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="datacache-kube-"))
    plane = KubeControlPlane(workdir)
    try:
        plane.start()
        if args.apply_manifests:
            subprocess.run(
                [
                    "kubectl",
                    f"--kubeconfig={plane.admin_kubeconfig}",
                    "apply",
                    "--server-side",
                    "-k",
                    str(REPO / "manifests"),
                ],
                check=True,
                timeout=120,
            )
        for i in range(1, args.nodes + 1):
            plane.add_node(f"node-{i}", zone="zone-a" if i % 2 else "zone-b")
    except (ControlPlaneError, KubeAPIError, subprocess.SubprocessError) as exc:
        plane.stop()
        print(f"kube-up: {exc}", file=sys.stderr)
        return 1
    print(f"API server:  {plane.server}")
    print(f"kubeconfig:  export KUBECONFIG={plane.admin_kubeconfig}")
    print(f"logs:        {workdir / 'logs'}")
    print("Ctrl-C stops every component.", flush=True)
    stop = False

    def interrupted(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        while not stop:
            signal.pause()
    finally:
        plane.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------------ per test

_KEPT_NAMESPACES = frozenset(
    {"default", "kube-system", "kube-public", "kube-node-lease", "datacache", "datacache-agent"}
)
_CLEANUP_TIMEOUT = 60.0
TEST_ADMIN = ("kube-system", "datacache-test-admin")
"""A ServiceAccount bound to cluster-admin: its token reaches the API server through the fault
proxy, which cannot pass client certificates on."""


def install_test_admin(plane: KubeControlPlane) -> None:
    namespace, name = TEST_ADMIN
    plane.create_or_replace(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }
    )
    plane.create_or_replace(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        }
    )


class KubeTest:
    """One test's use of the session's control plane: kubeconfigs, an optional fault proxy
    in front of the API server, and `cleanup()`, which removes what tests make (nodes,
    namespaces, Datasets, pods, Jobs, Leases, Secrets, webhooks) so the next test starts from
    a bare cluster."""

    def __init__(self, plane: KubeControlPlane, tmp_path: Path) -> None:
        self.plane = plane
        self.tmp_path = tmp_path
        self.kubeconfig = plane.write_admin_kubeconfig(tmp_path / "admin.kubeconfig")
        """The admin's kubeconfig (client certificate, system:masters)."""
        self._proxy: Any = None

    # The control plane's helpers, for brevity in tests.
    def add_node(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return self.plane.add_node(name, **kwargs)

    def get_node(self, name: str) -> dict[str, Any]:
        return self.plane.get_node(name)

    def delete_node(self, name: str) -> None:
        self.plane.delete_node(name)

    def node_labels(self, name: str) -> dict[str, str]:
        return dict(self.get_node(name)["metadata"].get("labels") or {})

    @property
    def proxy(self) -> Any:
        """A FaultProxy in front of the API server (started on first use, stopped by
        cleanup): clients reach it over plain HTTP with a bearer token."""
        if self._proxy is None:
            from tests.faultproxy import FaultProxy

            self._proxy = FaultProxy(
                self.plane.server, upstream_ssl=_ca_only(self.plane.ca_file)
            ).start()
        return self._proxy

    def token(self, namespace: str, name: str, **kwargs: Any) -> str:
        return self.plane.service_account_token(namespace, name, **kwargs)

    def roleless_token(self, namespace: str, name: str) -> str:
        """The token of a new ServiceAccount bound to no role: a real identity the API server
        refuses (403) for anything beyond discovery."""
        self.plane.ensure_namespace(namespace)
        self.plane.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )
        return self.token(namespace, name)

    def admin_token(self) -> str:
        return self.token(*TEST_ADMIN)

    def proxied_kubeconfig(self, token: str | None = None, name: str = "proxied") -> Path:
        """A kubeconfig through the fault proxy, as the test admin unless `token` is given."""
        return self.plane.write_token_kubeconfig(
            self.tmp_path / f"{name}.kubeconfig",
            token if token is not None else self.admin_token(),
            server=self.proxy.url,
        )

    def token_kubeconfig(self, token: str, name: str) -> Path:
        """A kubeconfig that talks straight to the API server with `token`."""
        return self.plane.write_token_kubeconfig(self.tmp_path / f"{name}.kubeconfig", token)

    def cleanup(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        reset_cluster(self.plane)


def reset_cluster(plane: KubeControlPlane) -> None:
    """Removes every object tests make; bounded, raises ControlPlaneError if it cannot."""
    for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
        for item in plane.get(f"/apis/admissionregistration.k8s.io/v1/{kind}")["items"]:
            plane.delete(f"/apis/admissionregistration.k8s.io/v1/{kind}/{item['metadata']['name']}")
    datasets = "/apis/datacache.io/v1alpha1"
    with contextlib.suppress(KubeAPIError):
        for item in plane.get(f"{datasets}/datasets")["items"]:
            meta = item["metadata"]
            path = f"{datasets}/namespaces/{meta['namespace']}/datasets/{meta['name']}"
            if meta.get("finalizers"):
                plane.patch(path, {"metadata": {"finalizers": None}})
            plane.delete(path)
    for job in plane.get("/apis/batch/v1/jobs")["items"]:
        meta = job["metadata"]
        plane.request(
            "DELETE",
            f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}",
            {"propagationPolicy": "Background"},
        )
    deadline = time.monotonic() + _CLEANUP_TIMEOUT
    while True:
        pods = plane.get("/api/v1/pods")["items"]
        if not pods:
            break
        if time.monotonic() > deadline:
            names = [p["metadata"]["name"] for p in pods]
            raise ControlPlaneError(f"pods left after cleanup: {names}")
        for pod in pods:
            meta = pod["metadata"]
            path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
            # No kubelet confirms a deletion here: strip finalizers (Jobs' tracking one) and
            # delete without a grace period.
            with contextlib.suppress(KubeAPIError):
                if meta.get("finalizers"):
                    plane.patch(path, {"metadata": {"finalizers": None}})
                plane.request("DELETE", path, {"gracePeriodSeconds": 0})
        time.sleep(0.1)
    for name in plane.node_names():
        plane.delete_node(name)
    for namespace in ("default", "datacache", "datacache-agent"):
        for kind, keep in (
            ("/apis/coordination.k8s.io/v1/namespaces/{}/leases", None),
            ("/api/v1/namespaces/{}/secrets", None),
            ("/api/v1/namespaces/{}/events", None),
            ("/api/v1/namespaces/{}/configmaps", "kube-root-ca.crt"),
        ):
            collection = kind.format(namespace)
            for item in plane.get(collection)["items"]:
                if item["metadata"]["name"] != keep:
                    plane.delete(f"{collection}/{item['metadata']['name']}")
    doomed = [
        ns["metadata"]["name"]
        for ns in plane.get("/api/v1/namespaces")["items"]
        if ns["metadata"]["name"] not in _KEPT_NAMESPACES
    ]
    # Not waited for: ensure_namespace waits when a test needs the name again.
    for name in doomed:
        plane.delete(f"/api/v1/namespaces/{name}")
