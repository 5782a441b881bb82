"""The datacache coordinator: dataset store, placement, replica tracking and node labels.

Layers (kept apart so decisions stay pure and testable):

- `placement`, `labels`: pure decision code, no I/O.
- `store`: SQLite persistence.
- `labelers`, `k8s_labeler`: where labels go (the coordinator's store, or Node objects).
- `reconciler`: the level-triggered loop tying state, placement and labels together.
- `service`, `server`, `__main__`: the gRPC edge and the process.
"""
