"""The deployment files: Kubernetes manifests in `manifests/` and the two Dockerfiles.

Everything here runs offline: manifests are validated against the Kubernetes 1.30 JSON schemas
that `kubernetes-validate` ships, and the rest are static checks that tie the manifests and the
images to the code (flag names, console scripts, the package version).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from agent.__main__ import main as agent_main
from coordinator.__main__ import main as coordinator_main
from coordinator.labels import OWNED_LABELS_ANNOTATION, READY_VALUE, label_key

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KUBERNETES_VERSION = "1.30"
NAMESPACE = "datacache"
AGENT_NAMESPACE = "datacache-agent"
AGENT_SA = "datacache-agent"
COORDINATOR_SA = "datacache-coordinator"
ENV_PREFIX = "DATACACHE_"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
# Groups every ServiceAccount of the namespace belongs to.
SA_GROUPS = frozenset(
    {
        "system:serviceaccounts",
        f"system:serviceaccounts:{NAMESPACE}",
        f"system:serviceaccounts:{AGENT_NAMESPACE}",
        "system:authenticated",
    }
)


def account_namespace(account: str) -> str:
    return AGENT_NAMESPACE if account == AGENT_SA else NAMESPACE


# What a binding to a role the manifests do not define may grant, for all we know.
EVERYTHING: list[dict[str, Any]] = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]

Doc = dict[str, Any]


# --- loading ---------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.iterdir() if p.suffix in {".yaml", ".yml"})


def manifest_files() -> list[Path]:
    return [p for p in yaml_files() if p.name != "kustomization.yaml"]


def load(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
    return docs


def documents() -> list[tuple[str, Doc]]:
    return [(path.name, doc) for path in manifest_files() for doc in load(path)]


def all_docs() -> list[Doc]:
    return [doc for _, doc in documents()]


def find(kind: str, name: str) -> Doc:
    found = [d for d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: Doc) -> Doc:
    containers: list[Doc] = pod_spec(workload)["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def mebibytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity in MiB (the suffixes the manifests use)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert match, f"unparsed quantity {quantity!r}"
    number, unit = match.groups()
    return float(number) * (units[unit] if unit else 1) / 2**20


def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data


# --- 1. schema validation ----------------------------------------------------------------------


def _doc_id(item: tuple[str, Doc]) -> str:
    filename, doc = item
    return f"{filename}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


@pytest.mark.parametrize("item", documents(), ids=_doc_id)
def test_manifest_validates_against_kubernetes_schema(item: tuple[str, Doc]) -> None:
    filename, doc = item
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{_doc_id(item)} is invalid at {where or '<root>'}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{filename}: {exc.message}")


def test_validation_rejects_a_broken_manifest() -> None:
    daemonset = find("DaemonSet", "datacache-agent")
    broken = json.loads(json.dumps(daemonset))
    broken["spec"]["updateStrategy"]["rollingUpdate"]["maxSurg"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_manifest_is_namespaced_in_datacache_or_cluster_scoped() -> None:
    agent_objects = {
        ("DaemonSet", "datacache-agent"),
        ("ServiceAccount", AGENT_SA),
        ("Service", "datacache-agent-metrics"),
    }
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "PriorityClass",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for doc in all_docs():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_scoped:
            assert namespace is None, f"{doc['kind']} {doc['metadata']['name']} has a namespace"
        elif (doc["kind"], doc["metadata"]["name"]) in agent_objects:
            assert namespace == AGENT_NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
        else:
            assert namespace == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
    enforce = "pod-security.kubernetes.io/enforce"
    # The agent's hostPath volume is forbidden by the baseline and restricted levels; nothing
    # else needs more than restricted.
    assert find("Namespace", AGENT_NAMESPACE)["metadata"]["labels"][enforce] == "privileged"
    assert find("Namespace", NAMESPACE)["metadata"]["labels"][enforce] == "restricted"


# --- 2. kustomization --------------------------------------------------------------------------


def test_kustomization_lists_exactly_the_manifest_files() -> None:
    kustomization = load(MANIFESTS / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    resources: list[str] = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for name in resources:
        assert (MANIFESTS / name).is_file(), f"kustomization lists missing file {name}"
    assert set(resources) == {p.name for p in manifest_files()}


# --- 3. RBAC -----------------------------------------------------------------------------------


def _subject_matches(subject: Doc, binding_namespace: str | None, account: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace", binding_namespace)
        return bool(subject.get("name") == account and namespace == account_namespace(account))
    if kind == "Group":
        return subject.get("name") in SA_GROUPS
    if kind == "User":
        return bool(
            subject.get("name") == f"system:serviceaccount:{account_namespace(account)}:{account}"
        )
    return False


def rules_bound_to(
    account: str, docs: Iterable[Doc], *, cluster_wide_only: bool = False
) -> list[Doc]:
    """Every RBAC rule the ServiceAccount gets from the bindings in `docs`.

    A binding to a role that `docs` do not define (a built-in such as cluster-admin) or to an
    aggregated ClusterRole counts as granting everything.
    """
    docs = list(docs)
    roles: dict[tuple[str, str | None, str], Doc] = {}
    for doc in docs:
        if doc["kind"] in {"Role", "ClusterRole"}:
            namespace = doc["metadata"].get("namespace") if doc["kind"] == "Role" else None
            roles[(doc["kind"], namespace, doc["metadata"]["name"])] = doc
    rules: list[Doc] = []
    binding_kinds = {"ClusterRoleBinding"}
    if not cluster_wide_only:
        binding_kinds.add("RoleBinding")
    for binding in docs:
        if binding["kind"] not in binding_kinds:
            continue
        namespace = binding["metadata"].get("namespace")
        if not any(_subject_matches(s, namespace, account) for s in binding.get("subjects", [])):
            continue
        ref = binding["roleRef"]
        role_namespace = namespace if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_namespace, ref["name"]))
        if role is None or "aggregationRule" in role:
            rules.extend(EVERYTHING)
        else:
            rules.extend(role.get("rules", []))
    return rules


def grants(rule: Doc, verb: str, group: str, resource: str, *, any_name: bool = False) -> bool:
    """Whether `rule` allows `verb` on `group`/`resource`. With `any_name`, a rule limited by
    resourceNames does not count."""
    if any_name and rule.get("resourceNames"):
        return False
    groups = rule.get("apiGroups", [])
    resources = rule.get("resources", [])
    verbs = rule.get("verbs", [])
    return (
        (group in groups or "*" in groups)
        and (resource in resources or "*" in resources)
        and (verb in verbs or "*" in verbs)
    )


def node_writes(rules: Iterable[Doc]) -> list[str]:
    """Descriptions of the rules that let a subject change Node objects (or their status)."""
    found = []
    for rule in rules:
        for verb in WRITE_VERBS:
            for resource in ("nodes", "nodes/status"):
                if grants(rule, verb, "", resource):
                    found.append(f"{verb} {resource} via {rule}")
    return found


def test_agent_service_account_cannot_write_nodes() -> None:
    docs = all_docs()
    find("ServiceAccount", AGENT_SA)
    assert node_writes(rules_bound_to(AGENT_SA, docs)) == []
    daemonset = find("DaemonSet", "datacache-agent")
    assert pod_spec(daemonset)["serviceAccountName"] == AGENT_SA
    # No Kubernetes API access is needed, so no token is mounted.
    assert pod_spec(daemonset)["automountServiceAccountToken"] is False


NODE_WRITER: Doc = {
    "kind": "ClusterRole",
    "metadata": {"name": "node-writer"},
    "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}],
}


@pytest.mark.parametrize(
    ("subject", "role"),
    [
        ({"kind": "ServiceAccount", "name": AGENT_SA, "namespace": AGENT_NAMESPACE}, "node-writer"),
        (
            {"kind": "User", "name": f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SA}"},
            "node-writer",
        ),
        ({"kind": "Group", "name": f"system:serviceaccounts:{AGENT_NAMESPACE}"}, "cluster-admin"),
    ],
    ids=["service-account", "user", "namespace-group-to-built-in-role"],
)
def test_node_write_check_catches_a_bad_binding(subject: Doc, role: str) -> None:
    binding = {
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "bad"},
        "roleRef": {"kind": "ClusterRole", "name": role},
        "subjects": [subject],
    }
    assert node_writes(rules_bound_to(AGENT_SA, [*all_docs(), NODE_WRITER, binding])) != []


def test_coordinator_may_label_nodes_and_hold_its_lease() -> None:
    docs = all_docs()
    find("ServiceAccount", COORDINATOR_SA)
    deployment = find("Deployment", "datacache-coordinator")
    assert pod_spec(deployment)["serviceAccountName"] == COORDINATOR_SA

    # Nodes are cluster-scoped: only a ClusterRoleBinding grants access to them.
    cluster_rules = rules_bound_to(COORDINATOR_SA, docs, cluster_wide_only=True)
    for verb in ("get", "list", "watch", "patch"):
        assert any(grants(r, verb, "", "nodes", any_name=True) for r in cluster_rules), verb
    for verb in ("create", "patch"):
        assert any(grants(r, verb, "", "events") for r in cluster_rules), verb

    rules = rules_bound_to(COORDINATOR_SA, docs)
    lease = ("coordination.k8s.io", "leases")
    assert any(grants(r, "create", *lease) for r in rules)
    for verb in ("get", "update"):
        assert any(grants(r, verb, *lease) for r in rules), verb
        assert not any(grants(r, verb, *lease, any_name=True) for r in rules), (
            f"{verb} on leases must be limited by resourceNames"
        )
        for rule in rules:
            if grants(rule, verb, *lease):
                assert rule["resourceNames"] == ["datacache-coordinator"]


# --- 4. workloads ------------------------------------------------------------------------------


def test_daemonset_update_strategy_never_runs_two_agents_on_a_node() -> None:
    strategy = find("DaemonSet", "datacache-agent")["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] in (0, "0", "0%")
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1


def test_daemonset_node_name_cache_directory_and_scheduling() -> None:
    daemonset = find("DaemonSet", "datacache-agent")
    spec = pod_spec(daemonset)
    container = only_container(daemonset)
    env = env_of(container)

    assert env["DATACACHE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    cache_dir = env["DATACACHE_CACHE_DIR"]["value"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    host_path = volumes[mounts[cache_dir]]["hostPath"]
    assert host_path == {"path": cache_dir, "type": "DirectoryOrCreate"}

    tolerations = spec["tolerations"]
    for effect in ("NoSchedule", "NoExecute"):
        assert {"operator": "Exists", "effect": effect} in tolerations, effect

    priority = find("PriorityClass", spec["priorityClassName"])
    assert not priority["metadata"]["name"].startswith("system-")
    assert priority["value"] == 1_000_000
    assert spec["terminationGracePeriodSeconds"] == 60


def test_agent_memory_is_sized_from_its_concurrency() -> None:
    container = only_container(find("DaemonSet", "datacache-agent"))
    resources = container["resources"]
    assert "cpu" not in resources.get("limits", {}), "no CPU limit for the agent"
    request = mebibytes(resources["requests"]["memory"])
    assert request == mebibytes(resources["limits"]["memory"])
    concurrency_value = env_of(container)["DATACACHE_CONCURRENCY"]["value"]
    # Documented: concurrency x 1 MiB of read buffers, plus a 256 MiB baseline.
    assert request >= int(concurrency_value) * 1 + 256


def test_coordinator_deployment() -> None:
    deployment = find("Deployment", "datacache-coordinator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = pod_spec(deployment)
    container = only_container(deployment)
    security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    assert isinstance(security["runAsUser"], int) and security["runAsUser"] != 0
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "--labeler=kubernetes" in container["args"]

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 7400, "metrics": 9400}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 7400, probe
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}

    db_path = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--db-path="))
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(db_path).parent) in mounted, "the database must be on a volume"


def test_agents_dial_the_coordinator_service() -> None:
    service = find("Service", "datacache-coordinator")
    deployment = find("Deployment", "datacache-coordinator")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert port["targetPort"] == "grpc"

    agent_env = env_of(only_container(find("DaemonSet", "datacache-agent")))
    expected = f"{service['metadata']['name']}.{NAMESPACE}.svc:{port['port']}"
    assert agent_env["DATACACHE_COORDINATOR"]["value"] == expected


def test_images_carry_the_package_version() -> None:
    version = project()["version"]
    for kind, name in (("DaemonSet", "datacache-agent"), ("Deployment", "datacache-coordinator")):
        image = only_container(find(kind, name))["image"]
        assert image == f"ghcr.io/datacache/{name}:{version}"


def test_optional_s3_settings_are_optional() -> None:
    container = only_container(find("DaemonSet", "datacache-agent"))
    (source,) = container["envFrom"]
    assert source["secretRef"] == {"name": "datacache-s3", "optional": True}
    endpoint = env_of(container)["DATACACHE_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]
    assert endpoint["optional"] is True


# --- 6. environment variables and flags --------------------------------------------------------


def envvar_names(command: click.Command) -> set[str]:
    """The environment variables a click command reads: DATACACHE_<OPTION NAME> under its
    `auto_envvar_prefix`, or the option's own `envvar`."""
    names: set[str] = set()
    for param in command.params:
        if not isinstance(param, click.Option) or not param.expose_value or param.name is None:
            continue
        if isinstance(param.envvar, str):
            names.add(param.envvar)
        elif param.envvar:
            names.update(param.envvar)
        else:
            names.add(ENV_PREFIX + param.name.upper())
    return names


def option_flags(command: click.Command) -> set[str]:
    return {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts}


# The agent image runs `datacache-agent run`; its container args must start with "run".
AGENT_RUN = agent_main.commands["run"] if isinstance(agent_main, click.Group) else agent_main
COMMANDS = {"datacache-agent": AGENT_RUN, "datacache-coordinator": coordinator_main}


def containers_by_command() -> Iterator[tuple[str, click.Command, Doc]]:
    for doc in all_docs():
        if doc["kind"] not in {"Deployment", "DaemonSet", "StatefulSet", "Job"}:
            continue
        for container in [*pod_spec(doc).get("initContainers", []), *pod_spec(doc)["containers"]]:
            image_name = container["image"].rsplit("/", 1)[-1].split(":", 1)[0].split("@")[0]
            assert image_name in COMMANDS, f"unknown image {container['image']}"
            yield image_name, COMMANDS[image_name], container


def test_envvar_names_follow_click() -> None:
    assert "DATACACHE_NODE_NAME" in envvar_names(AGENT_RUN)
    assert "DATACACHE_DB_PATH" in envvar_names(coordinator_main)
    assert "DATACACHE_VERSION" not in envvar_names(AGENT_RUN)


def test_every_environment_variable_is_a_name_a_shell_can_set() -> None:
    for command in COMMANDS.values():
        for name in envvar_names(command):
            assert re.fullmatch(r"DATACACHE_[A-Z0-9_]+", name), name
    # An on/off flag is named after its "on" form.
    assert {"DATACACHE_FSYNC", "DATACACHE_DROP_BEHIND"} <= envvar_names(AGENT_RUN)


def test_agent_container_runs_the_run_subcommand() -> None:
    for image, _, container in containers_by_command():
        if image == "datacache-agent":
            assert container.get("args", [])[:1] == ["run"]


def test_every_datacache_variable_in_the_manifests_is_a_flag() -> None:
    checked = 0
    for image, command, container in containers_by_command():
        known = envvar_names(command)
        for name in env_of(container):
            if name.startswith(ENV_PREFIX):
                assert name in known, f"{image}: {name} is not a flag of {image}"
                checked += 1
        flags = option_flags(command)
        for arg in container.get("args", []):
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in flags, f"{image}: unknown flag {arg}"
    assert checked >= 5


# --- 7. the Dataset CRD and its examples -------------------------------------------------------

EXAMPLES = MANIFESTS / "examples"


def dataset_crd() -> Doc:
    return find("CustomResourceDefinition", "datasets.datacache.io")


def dataset_schema() -> Doc:
    (version,) = dataset_crd()["spec"]["versions"]
    schema: Doc = version["schema"]["openAPIV3Schema"]
    return schema


def example_docs() -> list[tuple[str, Doc]]:
    return [(p.name, d) for p in sorted(EXAMPLES.glob("*.yaml")) for d in load(p)]


def schema_errors(obj: Doc) -> list[str]:
    validator = jsonschema.Draft7Validator(dataset_schema())
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def test_crd_is_namespaced_v1alpha1_with_status_and_printer_columns() -> None:
    crd = dataset_crd()
    assert crd["spec"]["group"] == "datacache.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == "Dataset"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns.keys() >= {"Source", "Replicas", "Phase", "Age"}
    # Every printer column points at a field the schema declares.
    for path in columns.values():
        node: Doc = dataset_schema()
        for part in path.strip(".").split("."):
            if part in ("metadata",):
                break
            node = node["properties"][part]
    spec = dataset_schema()["properties"]["spec"]["properties"]
    assert spec.keys() >= {
        "source",
        "replicas",
        "all",
        "nodeSelector",
        "tolerations",
        "credentialsSecretRef",
        "refreshPolicy",
        "pin",
    }
    status = dataset_schema()["properties"]["status"]["properties"]
    assert status.keys() >= {"phase", "version", "revision", "readyReplicas", "replicas"}
    assert status.keys() >= {"conditions", "observedGeneration"}


def test_example_dataset_matches_the_crd_schema() -> None:
    datasets = [d for _, d in example_docs() if d["kind"] == "Dataset"]
    assert datasets, "manifests/examples has no Dataset"
    for doc in datasets:
        assert doc["apiVersion"] == "datacache.io/v1alpha1"
        assert schema_errors(doc) == []


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"replicas": 0}, "spec.replicas"),
        ({"replicas": "two"}, "spec.replicas"),
        ({"source": "ftp://host/x"}, "spec.source"),
        ({"refreshPolicy": {"interval": "1 day"}}, "spec.refreshPolicy.interval"),
        ({"tolerations": [{"operator": "Maybe"}]}, "spec.tolerations.0.operator"),
        ({"credentialsSecretRef": {"name": "Not_A_Name"}}, "spec.credentialsSecretRef.name"),
    ],
)
def test_crd_schema_rejects_bad_specs(change: Doc, where: str) -> None:
    (example,) = [d for _, d in example_docs() if d["kind"] == "Dataset"]
    bad = json.loads(json.dumps(example))
    bad["spec"].update(change)
    assert any(e.startswith(where) for e in schema_errors(bad)), schema_errors(bad)


def test_example_job_requires_the_dataset_label() -> None:
    (dataset,) = [d for _, d in example_docs() if d["kind"] == "Dataset"]
    (job,) = [d for _, d in example_docs() if d["kind"] == "Job"]
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    assert job["metadata"]["namespace"] == dataset["metadata"]["namespace"]
    name = f"{dataset['metadata']['namespace']}/{dataset['metadata']['name']}"
    terms = pod_spec(job)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    expressions = [e for t in terms for e in t["matchExpressions"]]
    assert {"key": label_key(name), "operator": "In", "values": [READY_VALUE]} in expressions
    volume = pod_spec(job)["volumes"][0]["hostPath"]["path"]
    assert volume == f"/var/lib/datacache/datasets/{name}/current"


# --- 8. admission policy, dataset RBAC, agent probes -------------------------------------------

COORDINATOR_USER = f"system:serviceaccount:{NAMESPACE}:{COORDINATOR_SA}"


def test_admission_policy_fences_the_coordinators_node_writes() -> None:
    policy = find("ValidatingAdmissionPolicy", "datacache-coordinator-node-labels")
    binding = find("ValidatingAdmissionPolicyBinding", "datacache-coordinator-node-labels")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["nodes", "nodes/status"] and rule["operations"] == ["UPDATE"]
    (condition,) = spec["matchConditions"]
    assert f"'{COORDINATOR_USER}'" in condition["expression"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    # The policy's key prefix and annotation are the ones the coordinator writes.
    assert variables["labelPrefix"] == repr(label_key("default/x").split("/")[0] + "/")
    assert variables["ownedAnnotation"] == repr(OWNED_LABELS_ANNOTATION)
    expressions = " ".join(v["expression"] for v in spec["validations"])
    for needle in ("newLabels", "oldLabels", "newAnnotations", "object.spec == oldObject.spec"):
        assert needle in expressions


def test_coordinator_may_sync_datasets_and_read_its_secrets_only() -> None:
    docs = all_docs()
    cluster_rules = rules_bound_to(COORDINATOR_SA, docs, cluster_wide_only=True)
    group = "datacache.io"
    for verb in ("get", "list", "watch", "patch"):
        assert any(grants(r, verb, group, "datasets") for r in cluster_rules), verb
    assert any(grants(r, "update", group, "datasets/status") for r in cluster_rules)
    # Adding its own finalizer is a patch of the Dataset; the finalizers subresource matters
    # only for blockOwnerDeletion on owner references, which the coordinator never sets.
    assert not any(grants(r, "update", group, "datasets/finalizers") for r in cluster_rules)
    for verb in ("create", "delete"):
        assert not any(grants(r, verb, group, "datasets") for r in cluster_rules), verb
    # Secrets: get, in its own namespace only (a Role), never cluster-wide or list/watch.
    assert not any(grants(r, "get", "", "secrets") for r in cluster_rules)
    rules = rules_bound_to(COORDINATOR_SA, docs)
    assert any(grants(r, "get", "", "secrets") for r in rules)
    for verb in ("list", "watch", "create", "update", "patch", "delete"):
        assert not any(grants(r, verb, "", "secrets") for r in rules), verb
    assert not any(grants(r, "get", "", "secrets") for r in rules_bound_to(AGENT_SA, docs))


def test_agent_probes_its_grpc_health_port() -> None:
    container = only_container(find("DaemonSet", "datacache-agent"))
    health_port = next(
        p.default
        for p in AGENT_RUN.params
        if isinstance(p, click.Option) and p.name == "health_port"
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == health_port == 9402
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe


def test_metrics_services_reach_every_pod() -> None:
    for name, workload, port in (
        ("datacache-agent-metrics", find("DaemonSet", "datacache-agent"), 9401),
        ("datacache-coordinator-metrics", find("Deployment", "datacache-coordinator"), 9400),
    ):
        service = find("Service", name)
        assert service["spec"]["clusterIP"] == "None"
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        (entry,) = service["spec"]["ports"]
        container_ports = {p["name"]: p["containerPort"] for p in only_container(workload)["ports"]}
        assert container_ports[entry["targetPort"]] == entry["port"] == port
