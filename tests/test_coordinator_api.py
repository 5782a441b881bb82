"""DatasetService and NodeService over real gRPC against a coordinator process: validation and
status codes, update masks, refresh, pagination, placement snippets, node facts."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.json_format import MessageToDict

from datacache.localcluster import wait_until
from datacache.v1 import datacache_pb2 as pb
from datacache.v1 import datacache_pb2_grpc as pb_grpc
from tests.coordinator_sim import SimAgent, code_of, coordinator, datasets_stub, details_of, ready

SOURCE = "s3://bucket/data/"


def test_create_validates_every_field(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:

            def create(**fields: object) -> pb.CreateDatasetResponse:
                values: dict[str, object] = {"name": "d", "source": SOURCE, "replicas": 1}
                values.update(fields)
                response: pb.CreateDatasetResponse = stub.CreateDataset(
                    pb.CreateDatasetRequest(dataset=pb.Dataset(**values)),  # type: ignore[arg-type]
                    timeout=10,
                )
                return response

            bad: list[tuple[dict[str, object], str]] = [
                ({"node_selector": {"bad key!": "x"}}, "label key"),
                ({"node_selector": {"gpu": "-x"}}, "label value"),
                ({"node_selector": {"a" * 64: "x"}}, "label key"),
                ({"node_selector": {"Bad_Prefix/x": "y"}}, "prefix"),
                ({"tolerations": [pb.Toleration(key="k", operator="Sometimes")]}, "operator"),
                ({"tolerations": [pb.Toleration(key="k", effect="NoRun")]}, "effect"),
                ({"tolerations": [pb.Toleration(operator="Equal", value="v")]}, "empty key"),
                ({"tolerations": [pb.Toleration(key="k", operator="Exists", value="v")]}, "value"),
                ({"credentials_secret": "Not/A/Secret"}, "credentials_secret"),
                ({"replicas": 0}, "replicas"),
                ({"replicas": 10_001}, "replicas"),
                ({"replicas": 2, "max_replicas": 1}, "max_replicas"),
                ({"max_replicas": 10_001}, "max_replicas"),
                ({"all_nodes": True, "replicas": 0, "max_replicas": 3}, "all_nodes"),
                ({"name": "ns/x/y"}, "more than one"),
                ({"source": "ftp://x/y"}, "scheme"),
            ]
            for fields, word in bad:
                assert code_of(lambda f=fields: create(**f)) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[misc]
                assert word in details_of(lambda f=fields: create(**f)), fields  # type: ignore[misc]

            made = create(
                name="team-a/imagenet",
                all_nodes=True,
                replicas=0,
                node_selector={"example.com/gpu": "a100"},
                tolerations=[
                    pb.Toleration(key="dedicated", operator="Exists", effect="NoSchedule")
                ],
                pin=True,
                credentials_secret="s3-reader",
            ).dataset
            assert made.name == "team-a/imagenet"
            assert made.all_nodes and made.pin and made.revision == 1
            assert dict(made.node_selector) == {"example.com/gpu": "a100"}
            assert made.tolerations[0].operator == "Exists"
            assert made.resource_version > 0
            assert made.update_time.seconds > 0
            assert code_of(lambda: create(name="team-a/imagenet")) == grpc.StatusCode.ALREADY_EXISTS
            assert create(name="plain").dataset.name == "default/plain"
            scaling = create(name="sweep", replicas=1, max_replicas=4).dataset
            assert scaling.max_replicas == 4
            assert scaling.status.target_replicas == 1


def test_update_mask_and_refresh_start_revisions(tmp_path: Path) -> None:
    with coordinator(tmp_path) as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            stub.CreateDataset(
                pb.CreateDatasetRequest(dataset=pb.Dataset(name="d", source=SOURCE, replicas=1)),
                timeout=10,
            )

            def update(paths: list[str], **fields: object) -> pb.Dataset:
                response: pb.UpdateDatasetResponse = stub.UpdateDataset(
                    pb.UpdateDatasetRequest(
                        dataset=pb.Dataset(name="d", **fields),  # type: ignore[arg-type]
                        update_mask=FieldMask(paths=paths),
                    ),
                    timeout=10,
                )
                return response.dataset

            for paths in ([], ["name"], ["status"], ["replicas", "revision"]):
                assert (
                    code_of(lambda p=paths: update(p, replicas=2))  # type: ignore[misc]
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
            assert "changeable" in details_of(lambda: update(["create_time"]))
            assert (
                code_of(lambda: update(["node_selector"], node_selector={"x": "bad value"}))
                == grpc.StatusCode.INVALID_ARGUMENT
            )

            first = update(["replicas", "pin"], replicas=3, pin=True)
            assert (first.replicas, first.pin, first.revision) == (3, True, 1)
            # Fields outside the mask keep their values.
            second = update(["node_selector"], node_selector={"gpu": "yes"}, replicas=9)
            assert second.replicas == 3 and dict(second.node_selector) == {"gpu": "yes"}
            assert second.resource_version > first.resource_version
            assert update(["max_replicas"], max_replicas=6).max_replicas == 6
            assert "max_replicas" in details_of(lambda: update(["max_replicas"], max_replicas=2))
            # A scale past an unchanged max_replicas is allowed: demand stops raising it.
            assert update(["replicas"], replicas=7).max_replicas == 6
            assert (
                update(["replicas", "max_replicas"], replicas=3, max_replicas=0).max_replicas == 0
            )
            # Same source: no new revision; another source: a new one.
            assert update(["source"], source=SOURCE).revision == 1
            assert update(["source"], source="s3://bucket/other/").revision == 2
            refreshed = stub.RefreshDataset(pb.RefreshDatasetRequest(name="d"), timeout=10)
            assert refreshed.dataset.revision == 3
            assert update(["all_nodes", "replicas"], all_nodes=True, replicas=0).all_nodes
            assert (
                code_of(lambda: update(["all_nodes"], all_nodes=False))
                == grpc.StatusCode.INVALID_ARGUMENT
            )

            assert (
                code_of(
                    lambda: stub.RefreshDataset(pb.RefreshDatasetRequest(name="nope"), timeout=10)
                )
                == grpc.StatusCode.NOT_FOUND
            )
            stub.DeleteDataset(pb.DeleteDatasetRequest(name="d"), timeout=10)

            # No node holds it, so it is purged at once; until then changes are refused.
            def gone_or_refused() -> bool:
                code = code_of(lambda: update(["replicas"], replicas=1))
                return code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)

            assert gone_or_refused()


def test_list_pagination_and_placement_snippets(tmp_path: Path) -> None:
    with coordinator(tmp_path, "--node-cache-dir=/mnt/cache") as cluster:
        channel, stub = datasets_stub(cluster)
        with channel:
            names = [f"ds-{i:02d}" for i in range(7)]
            for name in names:
                stub.CreateDataset(
                    pb.CreateDatasetRequest(
                        dataset=pb.Dataset(name=name, source=SOURCE, replicas=1)
                    ),
                    timeout=10,
                )
            seen: list[str] = []
            token = ""
            while True:
                page = stub.ListDatasets(
                    pb.ListDatasetsRequest(page_size=3, page_token=token), timeout=10
                )
                assert len(page.datasets) <= 3
                seen += [d.name for d in page.datasets]
                token = page.next_page_token
                if not token:
                    break
            assert seen == [f"default/{n}" for n in names]
            for request in (
                pb.ListDatasetsRequest(page_size=-1),
                pb.ListDatasetsRequest(page_size=1001),
                pb.ListDatasetsRequest(page_token="../../etc"),
            ):
                assert (
                    code_of(lambda r=request: stub.ListDatasets(r, timeout=10))  # type: ignore[misc]
                    == grpc.StatusCode.INVALID_ARGUMENT
                )

            agent = SimAgent(channel, "node-1")
            agent.register()
            agent.wait_desired(lambda m: len(m.datasets) == 7, "all datasets desired")
            digest = "sha256:" + "b" * 64
            agent.report(ready("default/ds-00", digest))

            def placement() -> pb.GetPlacementResponse:
                response: pb.GetPlacementResponse = stub.GetPlacement(
                    pb.GetPlacementRequest(name="ds-00"), timeout=10
                )
                return response

            wait_until(lambda: list(placement().ready_nodes) == ["node-1"], 10, "a Ready node")
            answer = placement()
            assert answer.label_key == "dataset.datacache.io/default.ds-00"
            assert answer.node_path == "/mnt/cache/datasets/default/ds-00/current"
            assert answer.version == digest
            affinity = MessageToDict(answer.affinity)
            terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
                {"key": answer.label_key, "operator": "In", "values": ["ready"]}
            ]
            volume = MessageToDict(answer.volume)
            mount = MessageToDict(answer.volume_mount)
            assert volume["hostPath"]["path"] == answer.node_path
            assert mount == {
                "name": volume["name"],
                "mountPath": "/datasets/default/ds-00",
                "readOnly": True,
            }
            assert (
                code_of(lambda: stub.GetPlacement(pb.GetPlacementRequest(name="nope"), timeout=10))
                == grpc.StatusCode.NOT_FOUND
            )


def test_list_nodes_shows_uid_and_zone(tmp_path: Path) -> None:
    with (
        coordinator(tmp_path) as cluster,
        grpc.insecure_channel(cluster.coordinator_address) as channel,
    ):
        SimAgent(
            channel, "node-1", uid="uid-1", labels={"topology.kubernetes.io/zone": "z1"}
        ).register()
        bad = SimAgent(channel, "node-2", labels={"bad key!": "x"})
        assert code_of(bad.register) == grpc.StatusCode.INVALID_ARGUMENT
        nodes = pb_grpc.NodeServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=10)
        (node,) = nodes.nodes
        assert (node.name, node.uid, node.zone, node.unschedulable) == (
            "node-1",
            "uid-1",
            "z1",
            False,
        )
        assert node.agent_connected
