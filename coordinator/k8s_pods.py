"""Pod watch: feeds the demand of annotated pods (pending or running) to a `DemandTracker`.

Pods cannot be selected by annotation, so every pod that has not finished is watched (a field
selector leaves out Succeeded and Failed pods server-side); only annotated ones are kept.
"""

from __future__ import annotations

from typing import Any

from coordinator.demand import pod_demand
from coordinator.demand_service import DemandTracker
from coordinator.k8s_listwatch import ListWatch, ListWatchSettings, Obj

# Finished pods no longer want data.
FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def pod_watch(
    core_api: Any, tracker: DemandTracker, settings: ListWatchSettings | None = None
) -> ListWatch:
    """A started-on-demand watch (`start`/`stop`) of all pods into `tracker`."""

    def on_list(items: list[Obj]) -> None:
        tracker.replace_pods(d for d in (pod_demand(i) for i in items) if d is not None)

    def on_event(kind: str, obj: Obj) -> None:
        tracker.set_pod(_key(obj), None if kind == "DELETED" else pod_demand(obj))

    return ListWatch(
        "pod",
        core_api.list_pod_for_all_namespaces,
        on_list,
        on_event,
        list_kwargs={"field_selector": FIELD_SELECTOR},
        settings=settings,
    )
