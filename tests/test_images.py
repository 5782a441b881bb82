"""Static checks of the two Dockerfiles (no Docker engine runs here): multi-stage builds from a
base pinned by digest, the coordinator as a numeric non-root user, the agent as root with
libnfs and the reason written next to it, ENTRYPOINTs that are console scripts of the package,
and a build context that holds what `pip install .` needs."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.test_manifests import ROOT, find, only_container, pod_spec, project


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
# The agent's command wraps its click group so that a finished `fetch` skips the teardown.
CONSOLE_SCRIPTS = {"agent": "agent.__main__:entry", "coordinator": "coordinator.__main__:main"}
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
    assert scripts[command[0]] == CONSOLE_SCRIPTS[component]

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


def test_agent_image_has_libnfs_and_says_why() -> None:
    dockerfile = parse_dockerfile(DOCKERFILES["agent"])
    runs = " ".join(args for key, args in dockerfile.stages[-1].instructions if key == "RUN")
    assert re.search(r"\blibnfs\d+\b", runs), "the final agent stage installs no libnfs"
    assert any("libnfs" in c and "NFS" in c for c in dockerfile.comments)
    coordinator_runs = " ".join(
        args
        for key, args in parse_dockerfile(DOCKERFILES["coordinator"]).stages[-1].instructions
        if key == "RUN"
    )
    assert "libnfs" not in coordinator_runs, "the coordinator reads no NFS"


def test_a_floating_base_is_caught(tmp_path: Path) -> None:
    floating = tmp_path / "Dockerfile"
    floating.write_text("FROM python:3.11-slim AS builder\nRUN true\nFROM python:3.11-slim\n")
    stages = parse_dockerfile(floating).stages
    assert [is_pinned(s.image) for s in stages] == [False, False]
