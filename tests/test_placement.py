from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator.placement import Want, place

NODES = [f"node-{i}" for i in range(8)]
node_sets = st.sets(st.sampled_from(NODES), max_size=len(NODES))
wants_strategy = st.lists(
    st.builds(Want, st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 5)),
    max_size=4,
    unique_by=lambda w: w.dataset,
)


def test_places_requested_replicas_on_distinct_nodes() -> None:
    result = place([Want("a", 2)], {"n1", "n2", "n3"}, {}, {})
    assert len(result["a"]) == 2


def test_keeps_existing_assignments() -> None:
    current = {"a": frozenset({"n3", "n1"})}
    assert place([Want("a", 2)], {"n1", "n2", "n3"}, current, {}) == current


def test_scale_down_keeps_ready_replicas() -> None:
    current = {"a": frozenset({"n1", "n2", "n3"})}
    ready = {"a": frozenset({"n2"})}
    result = place([Want("a", 1)], {"n1", "n2", "n3"}, current, ready)
    assert result["a"] == frozenset({"n2"})


def test_dead_node_is_replaced() -> None:
    current = {"a": frozenset({"n1", "n2"})}
    result = place([Want("a", 2)], {"n2", "n3"}, current, {})
    assert result["a"] == frozenset({"n2", "n3"})


def test_spreads_datasets_over_nodes() -> None:
    result = place([Want(d, 1) for d in "abcd"], {"n1", "n2", "n3", "n4"}, {}, {})
    assert sorted(n for nodes in result.values() for n in nodes) == ["n1", "n2", "n3", "n4"]


@given(wants_strategy, node_sets, st.dictionaries(st.sampled_from("abcd"), node_sets))
def test_invariants(wants: list[Want], live: set[str], previous: dict[str, set[str]]) -> None:
    current = {d: frozenset(n) for d, n in previous.items()}
    result = place(wants, live, current, {})
    assert set(result) == {w.dataset for w in wants}
    for want in wants:
        nodes = result[want.dataset]
        assert nodes <= live
        assert len(nodes) == min(want.replicas, len(live))
        kept = current.get(want.dataset, frozenset()) & live
        # Minimal movement: no live holder is dropped unless the dataset has too many.
        assert len(kept - nodes) == max(0, len(kept) - want.replicas)


@given(wants_strategy, node_sets, st.sampled_from(NODES))
def test_unrelated_node_joining_moves_nothing(wants: list[Want], live: set[str], new: str) -> None:
    before = place(wants, live, {}, {})
    after = place(wants, live | {new}, before, {})
    for want in wants:
        if len(before[want.dataset]) == want.replicas:
            assert after[want.dataset] == before[want.dataset]
