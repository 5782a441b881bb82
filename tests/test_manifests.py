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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from agent.__main__ import main as agent_main
from coordinator.__main__ import main as coordinator_main

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KUBERNETES_VERSION = "1.30"
NAMESPACE = "datacache"
AGENT_SA = "datacache-agent"
COORDINATOR_SA = "datacache-coordinator"
ENV_PREFIX = "DATACACHE_"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
# Groups every ServiceAccount of the namespace belongs to.
SA_GROUPS = frozenset(
    {"system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"}
)
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
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
    for doc in all_docs():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_scoped:
            assert namespace is None, f"{doc['kind']} {doc['metadata']['name']} has a namespace"
        else:
            assert namespace == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
    namespace = find("Namespace", NAMESPACE)
    # The agent's hostPath volume is forbidden by the baseline and restricted levels.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


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
        return bool(subject.get("name") == account and namespace == NAMESPACE)
    if kind == "Group":
        return subject.get("name") in SA_GROUPS
    if kind == "User":
        return bool(subject.get("name") == f"system:serviceaccount:{NAMESPACE}:{account}")
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
        ({"kind": "ServiceAccount", "name": AGENT_SA, "namespace": NAMESPACE}, "node-writer"),
        ({"kind": "User", "name": f"system:serviceaccount:{NAMESPACE}:{AGENT_SA}"}, "node-writer"),
        ({"kind": "Group", "name": f"system:serviceaccounts:{NAMESPACE}"}, "cluster-admin"),
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


# --- 5. Dockerfiles ----------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [args for key, args in self.instructions if key == keyword]
        return values[-1] if values else None


@dataclass
class Dockerfile:
    stages: list[Stage]
    comments: list[str]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions (continuation lines joined) grouped by stage, and the comment lines."""
    stages: list[Stage] = []
    comments: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comments.append(line.lstrip("#").strip())
            continue
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical, pending = pending + line, ""
        keyword, _, args = logical.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    assert not pending, f"{path.name}: ends inside a continued line"
    return Dockerfile(stages, comments)


DOCKERFILES = {"agent": ROOT / "Dockerfile.agent", "coordinator": ROOT / "Dockerfile.coordinator"}
PINNED = re.compile(r"^[\w./-]+(?::(?P<tag>[\w.-]+))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")
EXACT_VERSION_TAG = re.compile(r"^\d+\.\d+\.\d+(?:-[\w.-]+)?$")


def is_pinned(image: str) -> bool:
    match = PINNED.match(image)
    if match is None:
        return False
    tag, digest = match.group("tag"), match.group("digest")
    if tag is not None and "latest" in tag:
        return False
    return digest is not None or (tag is not None and EXACT_VERSION_TAG.match(tag) is not None)


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("python:3.11", False),
        ("python:latest", False),
        ("python", False),
        ("python:3.11-slim-bookworm", False),
        ("python:${PYTHON}", False),
        ("python:3.11.16-slim-bookworm", True),
        ("python:3.11-slim-bookworm@sha256:" + "ab" * 32, True),
    ],
)
def test_pin_check(image: str, pinned: bool) -> None:
    assert is_pinned(image) is pinned


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_dockerfile_bases_are_pinned_and_shared(component: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[component])
    stage_names = {s.name for s in dockerfile.stages if s.name}
    external = [s.image for s in dockerfile.stages if s.image not in stage_names]
    assert len(dockerfile.stages) >= 2, "multi-stage build expected"
    for image in external:
        assert is_pinned(image), f"{component}: FROM {image} is not pinned"
    # The venv copied from the builder links to the base image's interpreter.
    assert len(set(external)) == 1, f"{component}: stages use different bases {external}"


def test_both_images_use_the_same_base() -> None:
    bases = {parse_dockerfile(p).stages[-1].image for p in DOCKERFILES.values()}
    assert len(bases) == 1, bases


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_dockerfile_entrypoint_is_the_console_script(component: str) -> None:
    final = parse_dockerfile(DOCKERFILES[component]).stages[-1]
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None
    command = json.loads(entrypoint)
    assert isinstance(command, list) and command, "exec-form ENTRYPOINT expected"
    scripts: dict[str, str] = project()["scripts"]
    assert command[0] in scripts, f"{command[0]} is not in [project.scripts]"
    assert scripts[command[0]] == f"{component}.__main__:main"

    env = " ".join(args for key, args in final.instructions if key == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env
    assert "PYTHONUNBUFFERED=1" in env
    copies = [args for key, args in final.instructions if key == "COPY"]
    assert any(c.startswith("--from=") and c.endswith("/opt/venv /opt/venv") for c in copies)


def _user_ids(user: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER {user} is not numeric"
    uid, gid = match.groups()
    return int(uid), None if gid is None else int(gid)


def test_coordinator_image_runs_as_the_manifest_user() -> None:
    final = parse_dockerfile(DOCKERFILES["coordinator"]).stages[-1]
    user = final.last("USER")
    assert user is not None, "coordinator final stage has no USER"
    uid, gid = _user_ids(user)
    assert uid != 0 and gid != 0
    deployment = find("Deployment", "datacache-coordinator")
    assert pod_spec(deployment)["securityContext"]["runAsUser"] == uid


def test_agent_image_runs_as_root_and_says_why() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["agent"])
    user = dockerfile.stages[-1].last("USER")
    assert user is None or _user_ids(user)[0] == 0
    assert any("root" in c and "hostPath" in c for c in dockerfile.comments)
    container = only_container(find("DaemonSet", "datacache-agent"))
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_build_context_holds_what_pip_install_needs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allowlist"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", data["project"]["readme"]}
    needed |= set(data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    for component, path in DOCKERFILES.items():
        builder = parse_dockerfile(path).stages[0]
        copied: set[str] = set()
        for key, args in builder.instructions:
            if key == "COPY" and not args.startswith("--from="):
                copied.update(p.rstrip("/") for p in args.split()[:-1])
        assert needed <= copied, f"{component}: builder does not copy {needed - copied}"
        assert copied <= allowed, f"{component}: .dockerignore excludes {copied - allowed}"


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
