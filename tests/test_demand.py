"""Demand-driven replica targets: who can run where, and when targets rise and fall."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator.cluster import NodeFacts, Taint
from coordinator.demand import (
    DatasetDemand,
    ExplicitDemand,
    PodDemand,
    Requirement,
    ScaleState,
    Trial,
    demand_by_dataset,
    next_scale,
    pod_demand,
    tolerates_all,
    wanted_replicas,
)
from coordinator.demand_service import DemandScaler
from coordinator.model import Toleration

GPU = "nvidia.com/gpu"
NODES = {
    "cpu-1": NodeFacts("cpu-1", labels={"pool": "cpu"}),
    "gpu-1": NodeFacts("gpu-1", labels={"pool": "gpu"}, extended_resources={GPU: 8}),
    "gpu-2": NodeFacts(
        "gpu-2",
        labels={"pool": "gpu"},
        taints=(Taint("gpu", "true", "NoSchedule"),),
        extended_resources={GPU: 8},
    ),
    "gpu-3": NodeFacts(
        "gpu-3", labels={"pool": "gpu"}, unschedulable=True, extended_resources={GPU: 8}
    ),
}


def test_tolerations_follow_the_scheduler_rules() -> None:
    taint = Taint("gpu", "true", "NoSchedule")
    assert not tolerates_all([], [taint])
    assert tolerates_all([], [Taint("x", "", "PreferNoSchedule")])
    assert tolerates_all([Toleration("gpu", "Equal", "true", "NoSchedule")], [taint])
    assert not tolerates_all([Toleration("gpu", "Equal", "false")], [taint])
    assert tolerates_all([Toleration("gpu", "Exists")], [taint])
    assert tolerates_all([Toleration(operator="Exists")], [taint])
    assert not tolerates_all([Toleration("gpu", "Exists", effect="NoExecute")], [taint])


def test_trials_run_where_selector_affinity_taints_and_resources_allow() -> None:
    def where(trial: Trial) -> set[str]:
        return {n for n, f in NODES.items() if trial.can_run_on(f)}

    assert where(Trial()) == {"cpu-1", "gpu-1"}
    assert where(Trial(extended_resources={GPU: 1})) == {"gpu-1"}
    assert where(Trial(extended_resources={GPU: 9})) == set()
    tolerant = Trial(tolerations=(Toleration("gpu", "Exists"),))
    assert where(tolerant) == {"cpu-1", "gpu-1", "gpu-2"}
    assert where(Trial(node_selector={"pool": "gpu"})) == {"gpu-1"}
    terms = ((Requirement("pool", "In", ("cpu",)),), (Requirement("pool", "NotIn", ("gpu",)),))
    assert where(Trial(required_terms=terms)) == {"cpu-1"}
    assert Requirement("rank", "Gt", ("3",)).matches({"rank": "4"})
    assert not Requirement("rank", "Lt", ("3",)).matches({"rank": "x"})
    assert Requirement("a", "DoesNotExist").matches({})


def test_demand_counts_pods_and_live_explicit_demand() -> None:
    gpu_trial = Trial(extended_resources={GPU: 1}, tolerations=(Toleration("gpu", "Exists"),))
    pods = [
        PodDemand("ml/t1", ("ml/data",), gpu_trial),
        PodDemand("ml/t2", ("ml/data", "ml/other"), Trial(), node_name="cpu-1"),
    ]
    explicit = [
        ExplicitDemand("ml/data", "sweep", 3, expires_at=200.0),
        ExplicitDemand("ml/data", "old", 50, expires_at=50.0),
    ]
    demand = demand_by_dataset(pods, explicit, NODES, now=100.0)
    assert demand["ml/data"] == DatasetDemand(5, frozenset({"gpu-1", "gpu-2", "cpu-1"}))
    assert demand["ml/other"] == DatasetDemand(1, frozenset({"cpu-1"}))


def test_wanted_replicas_is_bounded_by_nodes_and_limits() -> None:
    eight_on_four = DatasetDemand(8, frozenset({"a", "b", "c", "d"}))
    assert wanted_replicas(1, 4, eight_on_four) == 4
    assert wanted_replicas(1, 3, eight_on_four) == 3
    assert wanted_replicas(1, 10, DatasetDemand(2, frozenset({"a", "b", "c"}))) == 2
    assert wanted_replicas(2, 0, eight_on_four) == 2
    assert wanted_replicas(2, 10, None) == 2


def test_target_rises_at_once_and_falls_after_the_cooldown() -> None:
    busy = DatasetDemand(8, frozenset({"a", "b", "c", "d"}))
    state = next_scale(1, 4, busy, None, now=0.0, cooldown_seconds=60)
    assert state == ScaleState(4, 0.0)
    state = next_scale(1, 4, busy, state, now=30.0, cooldown_seconds=60)
    assert state == ScaleState(4, 30.0)
    state = next_scale(1, 4, None, state, now=60.0, cooldown_seconds=60)
    assert state.target == 4, "held during the cool-down"
    state = next_scale(1, 4, None, state, now=89.0, cooldown_seconds=60)
    assert state.target == 4
    state = next_scale(1, 4, None, state, now=90.0, cooldown_seconds=60)
    assert state == ScaleState(1, 90.0)


@given(
    replicas=st.integers(1, 20),
    extra=st.integers(0, 20),
    trials=st.integers(0, 50),
    nodes=st.integers(0, 30),
    previous=st.integers(1, 40),
    elapsed=st.floats(0, 1000),
)
def test_targets_stay_within_bounds(
    replicas: int, extra: int, trials: int, nodes: int, previous: int, elapsed: float
) -> None:
    max_replicas = replicas + extra
    demand = DatasetDemand(trials, frozenset(str(i) for i in range(nodes)))
    state = next_scale(
        replicas, max_replicas, demand, ScaleState(previous, 0.0), elapsed, cooldown_seconds=300
    )
    assert replicas <= state.target <= max(replicas, max_replicas)
    assert state.target >= wanted_replicas(replicas, max_replicas, demand)


def test_pod_demand_reads_what_the_scheduler_reads() -> None:
    label = "dataset.datacache.io/ml.data"
    pod = {
        "metadata": {
            "name": "t1",
            "namespace": "ml",
            "annotations": {"datacache.io/dataset": "data, ml/data, other/x, Bad_"},
        },
        "spec": {
            "nodeSelector": {"pool": "gpu"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a"]},
                                    {"key": label, "operator": "In", "values": ["ready"]},
                                ]
                            }
                        ]
                    }
                }
            },
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {"resources": {"limits": {GPU: "2", "cpu": "4"}}},
                {"resources": {"requests": {GPU: "1"}}},
            ],
        },
        "status": {"phase": "Pending"},
    }
    demand = pod_demand(pod)
    assert demand is not None
    assert demand.pod == "ml/t1"
    assert demand.datasets == ("ml/data", "other/x")
    assert demand.trial.node_selector == {"pool": "gpu"}
    # The dataset's own label says where the data is, not where the trial can run.
    assert demand.trial.required_terms == ((Requirement("zone", "In", ("a",)),),)
    assert demand.trial.tolerations == (Toleration("gpu", "Exists", "", "NoSchedule"),)
    assert demand.trial.extended_resources == {GPU: 3}
    assert demand.node_name == ""

    pod["status"] = {"phase": "Succeeded"}
    assert pod_demand(pod) is None
    assert pod_demand({"metadata": {"name": "p"}, "spec": {}}) is None


def test_scaler_keeps_held_replicas_after_a_restart_until_the_cooldown() -> None:
    scaler = DemandScaler(cooldown_seconds=10)
    specs = [("ml/data", 1, 4), ("ml/fixed", 2, 0)]
    # A fresh scaler (a restarted coordinator) with no demand listed yet keeps what is held.
    held = {"ml/data": 3, "ml/fixed": 5}
    assert scaler.targets(specs, {}, now=100.0, held=held) == {"ml/data": 3, "ml/fixed": 2}
    assert scaler.next_cooldown_end() == 110.0
    assert scaler.targets(specs, {}, now=105.0, held=held)["ml/data"] == 3
    assert scaler.targets(specs, {}, now=110.0, held=held)["ml/data"] == 1
    assert scaler.next_cooldown_end() is None
    # Demand raises it again at once.
    demand = {"ml/data": DatasetDemand(8, frozenset({"a", "b", "c", "d", "e"}))}
    assert scaler.targets(specs, demand, now=111.0)["ml/data"] == 4
    assert scaler.target("ml/data") == 4
    assert scaler.next_cooldown_end() == 121.0
