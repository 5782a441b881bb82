from __future__ import annotations

from collections import Counter

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from coordinator.cluster import Taint
from coordinator.model import Toleration
from coordinator.placement import (
    ZONE_LABEL,
    Node,
    Resident,
    Want,
    choose_evictions,
    eligible,
    place,
    tolerates,
)

NAMES = [f"node-{i}" for i in range(8)]
GIB = 1 << 30


def plain(*names: str) -> dict[str, Node]:
    return {n: Node(n) for n in names}


node_strategy = st.builds(
    lambda name, zone, gpu, tainted, cordoned, free: Node(
        name=name,
        labels={ZONE_LABEL: zone, **({"gpu": "yes"} if gpu else {})},
        taints=(Taint("dedicated", "ml", "NoSchedule"),) if tainted else (),
        unschedulable=cordoned,
        free_bytes=free,
    ),
    st.sampled_from(NAMES),
    st.sampled_from(["a", "b", "c"]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 8).map(lambda g: g * GIB)),
)
nodes_strategy = st.lists(node_strategy, max_size=8, unique_by=lambda n: n.name).map(
    lambda ns: {n.name: n for n in ns}
)
wants_strategy = st.lists(
    st.builds(
        Want,
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(1, 5),
        st.booleans(),
        st.sampled_from([{}, {"gpu": "yes"}]),
        st.sampled_from([(), (Toleration("dedicated", "Equal", "ml", "NoSchedule"),)]),
        st.integers(0, 3).map(lambda g: g * GIB),
    ),
    max_size=4,
    unique_by=lambda w: w.dataset,
)
previous_strategy = st.dictionaries(
    st.sampled_from("abcd"), st.frozensets(st.sampled_from(NAMES), max_size=8)
)


def test_places_requested_replicas_on_distinct_nodes() -> None:
    result = place([Want("a", 2)], plain("n1", "n2", "n3"), {}, {})
    assert len(result["a"]) == 2


def test_keeps_existing_assignments() -> None:
    current = {"a": frozenset({"n3", "n1"})}
    assert place([Want("a", 2)], plain("n1", "n2", "n3"), current, {}) == current


def test_scale_down_keeps_ready_replicas() -> None:
    current = {"a": frozenset({"n1", "n2", "n3"})}
    ready = {"a": frozenset({"n2"})}
    result = place([Want("a", 1)], plain("n1", "n2", "n3"), current, ready)
    assert result["a"] == frozenset({"n2"})


def test_dead_node_is_replaced() -> None:
    current = {"a": frozenset({"n1", "n2"})}
    result = place([Want("a", 2)], plain("n2", "n3"), current, {})
    assert result["a"] == frozenset({"n2", "n3"})


def test_a_returning_ready_copy_wins_over_a_fetching_one() -> None:
    nodes = plain("n1", "n2", "n3")
    # n1's lease expired, the replica went to n2; n1 comes back with its Ready copy.
    result = place([Want("a", 1)], nodes, {"a": frozenset({"n2"})}, {"a": frozenset({"n1"})})
    assert result["a"] == {"n1"}
    # Enough Ready copies already: a Ready copy being deleted elsewhere is not taken back.
    ready = {"a": frozenset({"n1", "n2"})}
    assert place([Want("a", 1)], nodes, {"a": frozenset({"n2"})}, ready)["a"] == {"n2"}


def test_spreads_datasets_over_nodes() -> None:
    result = place([Want(d, 1) for d in "abcd"], plain("n1", "n2", "n3", "n4"), {}, {})
    assert sorted(n for nodes in result.values() for n in nodes) == ["n1", "n2", "n3", "n4"]


def test_spreads_replicas_across_zones() -> None:
    nodes = {
        f"{zone}{i}": Node(f"{zone}{i}", {ZONE_LABEL: zone}) for zone in "xyz" for i in range(3)
    }
    result = place([Want("a", 3)], nodes, {}, {})
    assert sorted(nodes[n].zone for n in result["a"]) == ["x", "y", "z"]


def test_prefers_nodes_holding_an_older_version() -> None:
    nodes = plain(*NAMES)
    for holder in ("node-5", "node-6"):
        result = place([Want("a", 1)], nodes, {}, {}, holding={"a": frozenset({holder})})
        assert result["a"] == {holder}


def test_added_replicas_go_where_demanding_pods_run_first() -> None:
    nodes = plain(*NAMES)
    nodes["node-7"] = Node("node-7", unschedulable=True)
    prefer = frozenset({"node-3", "node-6", "node-7"})
    current = {"a": frozenset({"node-1"})}
    result = place([Want("a", 3, prefer=prefer)], nodes, current, {})
    # Cordoned node-7 cannot take one; the rest of the count follows the usual order.
    assert result["a"] == {"node-1", "node-3", "node-6"}
    more = place([Want("a", 4, prefer=prefer)], nodes, current, {})["a"]
    assert {"node-1", "node-3", "node-6"} < more and "node-7" not in more
    # A node holding a copy still comes first: it moves the least data.
    held = place([Want("a", 2, prefer=prefer)], nodes, current, {}, {"a": frozenset({"node-2"})})
    assert held["a"] == {"node-1", "node-2"}


def test_node_selector_taints_and_cordon() -> None:
    nodes = {
        "gpu": Node("gpu", {"gpu": "yes"}),
        "cpu": Node("cpu", {}),
        "tainted": Node("tainted", {"gpu": "yes"}, (Taint("dedicated", "ml", "NoSchedule"),)),
        "cordoned": Node("cordoned", {"gpu": "yes"}, unschedulable=True),
        "soft": Node("soft", {"gpu": "yes"}, (Taint("x", "", "PreferNoSchedule"),)),
    }
    result = place([Want("a", 5, node_selector={"gpu": "yes"})], nodes, {}, {})
    assert result["a"] == {"gpu", "soft"}
    tolerating = Want(
        "a", 5, node_selector={"gpu": "yes"}, tolerations=(Toleration("dedicated", "Exists"),)
    )
    assert place([tolerating], nodes, {}, {})["a"] == {"gpu", "soft", "tainted"}
    # A cordoned node keeps what it has, but gets nothing new.
    kept = place([Want("a", 5)], nodes, {"a": frozenset({"cordoned"})}, {})
    assert "cordoned" in kept["a"]


def test_tolerations_follow_the_scheduler() -> None:
    taint = Taint("k", "v", "NoExecute")
    assert tolerates([Toleration("k", "Equal", "v", "NoExecute")], taint)
    assert tolerates([Toleration("k", "Exists")], taint)
    assert tolerates([Toleration("", "Exists")], taint)
    assert not tolerates([Toleration("k", "Equal", "w")], taint)
    assert not tolerates([Toleration("k", "Exists", effect="NoSchedule")], taint)


def test_capacity_counts_what_this_pass_placed() -> None:
    nodes = {"small": Node("small", free_bytes=3 * GIB), "big": Node("big", free_bytes=10 * GIB)}
    wants = [Want(d, 1, size_bytes=2 * GIB) for d in "abcd"]
    result = place(wants, nodes, {}, {})
    load = Counter(n for ns in result.values() for n in ns)
    assert load["small"] <= 1 and load["big"] <= 4
    assert place([Want("x", 1, size_bytes=20 * GIB)], nodes, {}, {})["x"] == frozenset()


def test_all_nodes_includes_later_nodes() -> None:
    want = Want("a", 0, all_nodes=True, node_selector={"gpu": "yes"})
    nodes = {n: Node(n, {"gpu": "yes"}) for n in ("g1", "g2")} | {"c1": Node("c1")}
    first = place([want], nodes, {}, {})
    assert first["a"] == {"g1", "g2"}
    nodes["g3"] = Node("g3", {"gpu": "yes"})
    assert place([want], nodes, first, {})["a"] == {"g1", "g2", "g3"}


def test_cooldown_keeps_an_evicted_dataset_off_the_node() -> None:
    result = place(
        [Want("a", 1)], plain("n1", "n2"), {"a": frozenset({"n1"})}, {}, cooldown={("a", "n1")}
    )
    assert result["a"] == {"n2"}


@settings(max_examples=300)
@given(wants_strategy, nodes_strategy, previous_strategy)
def test_invariants(
    wants: list[Want], nodes: dict[str, Node], current: dict[str, frozenset[str]]
) -> None:
    result = place(wants, nodes, current, {})
    assert set(result) == {w.dataset for w in wants}
    room = {n: node.free_bytes for n, node in nodes.items()}
    for want in wants:
        chosen = result[want.dataset]
        kept = current.get(want.dataset, frozenset())
        # Never more than asked, never a node that is not live or violates a constraint.
        if not want.all_nodes:
            assert len(chosen) <= want.replicas
        for name in chosen:
            assert name in nodes and eligible(want, nodes[name])
            if name not in kept:
                assert not nodes[name].unschedulable
        new = [n for n in chosen if n not in kept]
        for name in new:
            if room[name] is not None:
                room[name] = room[name] - want.size_bytes  # type: ignore[operator]
        # Minimal movement: no still-eligible holder is dropped unless there are too many.
        holders = {n for n in kept if n in nodes and eligible(want, nodes[n])}
        if not want.all_nodes:
            assert len(holders - chosen) == max(0, len(holders) - want.replicas)
            # As many as possible: short only when no candidate with room was left.
            if len(chosen) < want.replicas:
                spare = [
                    n
                    for n, node in nodes.items()
                    if n not in chosen
                    and not node.unschedulable
                    and eligible(want, node)
                    and (node.free_bytes is None or node.free_bytes >= want.size_bytes)
                ]
                assert all(room[n] is not None for n in spare)
        else:
            assert holders <= chosen
    # Never a node without room for what placement newly put there.
    for name, left in room.items():
        assert left is None or left >= 0, name


@given(wants_strategy, nodes_strategy, st.sampled_from(NAMES))
def test_unrelated_node_joining_moves_nothing(
    wants: list[Want], nodes: dict[str, Node], new: str
) -> None:
    assume(new not in nodes)
    before = place(wants, nodes, {}, {})
    after = place(wants, nodes | {new: Node(new)}, before, {})
    for want in wants:
        if not want.all_nodes:
            assert (
                after[want.dataset] == before[want.dataset]
                or len(before[want.dataset]) < want.replicas
            )
        else:
            assert after[want.dataset] - before[want.dataset] <= {new}


@given(wants_strategy, nodes_strategy)
def test_unrelated_node_leaving_moves_only_its_replicas(
    wants: list[Want], nodes: dict[str, Node]
) -> None:
    before = place(wants, nodes, {}, {})
    if not nodes:
        return
    gone = sorted(nodes)[0]
    rest = {n: node for n, node in nodes.items() if n != gone}
    after = place(wants, rest, before, {})
    for want in wants:
        assert before[want.dataset] - {gone} <= after[want.dataset]


def test_eviction_takes_least_recently_used_unpinned_first() -> None:
    residents = [
        Resident("old", 5, pinned=False, last_used=100, ready_replicas=1),
        Resident("new", 5, pinned=False, last_used=900, ready_replicas=1),
        Resident("pinned-last", 50, pinned=True, last_used=1, ready_replicas=1),
        Resident("pinned-spare", 50, pinned=True, last_used=2, ready_replicas=2),
    ]
    assert choose_evictions(4, residents, set()) == ["old"]
    assert choose_evictions(8, residents, set()) == ["old", "new"]
    assert choose_evictions(20, residents, set()) == ["old", "new", "pinned-spare"]
    assert choose_evictions(8, residents, {"old"}) == ["new", "pinned-spare"]
    assert choose_evictions(0, residents, set()) == []


@given(
    st.integers(0, 200),
    st.lists(
        st.builds(
            Resident,
            st.sampled_from("abcdefgh"),
            st.integers(0, 50),
            st.booleans(),
            st.floats(0, 1000),
            st.integers(1, 3),
        ),
        unique_by=lambda r: r.dataset,
    ),
    st.sets(st.sampled_from("abcdefgh")),
)
def test_eviction_properties(pressure: int, residents: list[Resident], needing: set[str]) -> None:
    victims = choose_evictions(pressure, residents, needing)
    by_name = {r.dataset: r for r in residents}
    assert len(set(victims)) == len(victims)
    for victim in victims:
        resident = by_name[victim]
        assert victim not in needing
        assert not (resident.pinned and resident.ready_replicas <= 1)
    # Unpinned ones go before any pinned one, and no more than needed.
    pinned_seen = False
    for victim in victims:
        pinned_seen = pinned_seen or by_name[victim].pinned
        assert not (pinned_seen and not by_name[victim].pinned)
    if victims:
        assert sum(by_name[v].size_bytes for v in victims[:-1]) < pressure
