from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from coordinator.labels import (
    LABEL_PREFIX,
    OWNED_LABELS_ANNOTATION,
    desired_node_labels,
    label_key,
    label_patch,
)

_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
dataset_names = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,250}[a-z0-9])?", fullmatch=True).filter(
    lambda s: ".." not in s and ".-" not in s and "-." not in s
)


@given(dataset_names)
def test_label_keys_are_valid_kubernetes_keys(name: str) -> None:
    key = label_key(f"team-{len(name) % 7}/{name}")
    prefix, _, part = key.partition("/")
    assert prefix == LABEL_PREFIX
    assert len(part) <= 63
    assert _NAME_PART.fullmatch(part), part
    assert label_key(f"team-{len(name) % 7}/{name}") == key


def test_short_names_are_kept_long_names_hashed() -> None:
    assert label_key("default/imagenet") == f"{LABEL_PREFIX}/default.imagenet"
    assert label_key("ml/imagenet") != label_key("ml.imagenet")
    long_a, long_b = "a" * 70, "a" * 69 + "b"
    assert label_key(long_a) != label_key(long_b)
    assert len(label_key(long_a).split("/")[1]) == 63


def test_patch_sets_desired_and_removes_only_owned_labels() -> None:
    key_a, key_b = label_key("a"), label_key("b")
    labels = {key_a: "ready", "team": "ml", f"{LABEL_PREFIX}/foreign": "x"}
    annotations = {OWNED_LABELS_ANNOTATION: key_a}
    patch = label_patch(labels, annotations, {key_b: "ready"})
    assert patch == {
        "metadata": {
            "labels": {key_b: "ready", key_a: None},
            "annotations": {OWNED_LABELS_ANNOTATION: key_b},
        }
    }


def test_patch_is_none_when_converged() -> None:
    key = label_key("a")
    assert label_patch({key: "ready"}, {OWNED_LABELS_ANNOTATION: key}, {key: "ready"}) is None


def test_removing_last_label_drops_the_annotation() -> None:
    key = label_key("a")
    patch = label_patch({key: "ready"}, {OWNED_LABELS_ANNOTATION: key}, {})
    assert patch == {
        "metadata": {"labels": {key: None}, "annotations": {OWNED_LABELS_ANNOTATION: None}}
    }


def test_desired_labels_from_ready_nodes() -> None:
    result = desired_node_labels({"a": frozenset({"n1", "n2"}), "b": frozenset({"n2"})})
    assert result == {
        "n1": {label_key("a"): "ready"},
        "n2": {label_key("a"): "ready", label_key("b"): "ready"},
    }
