"""The test control plane is a real one: the API server authorises with RBAC, admits with Pod
Security, the scheduler binds, the Job controller makes pods, data survives an API server
restart, and the fault proxy relays and injects as the tests expect."""

from __future__ import annotations

import pytest

from datacache.localcluster import wait_until
from tests.faultproxy import Fault, Rule
from tests.kubecontrolplane import KubeAPIError, KubeTest, token_subject


def _pod(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], **spec},
    }


def test_versions_admission_and_authorisation_are_a_real_clusters(kube: KubeTest) -> None:
    version = kube.plane.get("/version")
    assert version["gitVersion"] == "v1.36.3"
    # A bound ServiceAccount token with no role may do nothing (RBAC, not AlwaysAllow).
    token = kube.roleless_token("team", "nobody")
    assert token_subject(token)["sub"] == "system:serviceaccount:team:nobody"
    with pytest.raises(KubeAPIError) as refused:
        kube.plane.request("GET", "/api/v1/nodes", token=token)
    assert refused.value.status == 403
    # Pod Security admission enforces a namespace's level.
    kube.plane.ensure_namespace(
        "restricted-team", labels={"pod-security.kubernetes.io/enforce": "baseline"}
    )
    privileged = _pod(
        "p",
        volumes=[{"name": "host", "hostPath": {"path": "/var/lib/datacache"}}],
    )
    with pytest.raises(KubeAPIError) as denied:
        kube.plane.create("/api/v1/namespaces/restricted-team/pods", privileged)
    assert denied.value.status == 403 and "hostPath volumes" in str(denied.value)


def test_nodes_register_ready_and_the_scheduler_binds_to_them(kube: KubeTest) -> None:
    node = kube.add_node("n1", zone="zone-a", allocatable={"ephemeral-storage": "50Gi"})
    assert node["spec"].get("taints") is None
    assert node["metadata"]["labels"]["topology.kubernetes.io/zone"] == "zone-a"
    assert node["status"]["allocatable"]["ephemeral-storage"] == "50Gi"
    assert node["status"]["conditions"][0]["type"] == "Ready"
    kube.plane.ensure_namespace("work")
    kube.plane.create("/api/v1/namespaces/work/pods", _pod("p"))

    def bound() -> bool:
        pod = kube.plane.get("/api/v1/namespaces/work/pods/p")
        return bool(pod["spec"].get("nodeName") == "n1")

    wait_until(bound, 60, "kube-scheduler to bind the pod")


def test_the_job_controller_makes_pods(kube: KubeTest) -> None:
    kube.plane.ensure_namespace("work")
    kube.plane.create(
        "/apis/batch/v1/namespaces/work/jobs",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "j"},
            "spec": {
                "parallelism": 2,
                "completions": 2,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox"}],
                    }
                },
            },
        },
    )

    def pods() -> int:
        items = kube.plane.get("/api/v1/namespaces/work/pods")["items"]
        return sum(1 for p in items if p["metadata"]["labels"].get("job-name") == "j")

    wait_until(lambda: pods() == 2, 60, "the Job's 2 pods")


def test_objects_survive_an_api_server_restart(kube: KubeTest) -> None:
    kube.add_node("n1")
    uid = kube.get_node("n1")["metadata"]["uid"]
    kube.plane.restart_apiserver(kill=True)
    assert kube.get_node("n1")["metadata"]["uid"] == uid


def test_the_fault_proxy_relays_and_injects(kube: KubeTest) -> None:
    kube.add_node("n1")
    token = kube.admin_token()
    through = kube.proxy.url
    node = kube.plane.request("GET", "/api/v1/nodes/n1", token=token, server=through)
    assert node["metadata"]["name"] == "n1"
    kube.proxy.set_rules(
        [Rule(Fault("answer", status=429, retry_after=3), path_contains="/nodes/", limit=1)]
    )
    with pytest.raises(KubeAPIError) as throttled:
        kube.plane.request("GET", "/api/v1/nodes/n1", token=token, server=through)
    assert throttled.value.status == 429 and throttled.value.reason == "TooManyRequests"
    again = kube.plane.request("GET", "/api/v1/nodes/n1", token=token, server=through)
    assert again["metadata"]["name"] == "n1"
    assert [kube.proxy.statuses()[r.number] for r in kube.proxy.requests] == [200, 429, 200]
