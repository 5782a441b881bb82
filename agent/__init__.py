"""The datacache agent: copies datasets onto this node's disk and reports to the coordinator.

Modules, from the disk up:

- `keys`: object key -> safe relative path (keys are hostile input).
- `sources`: the narrow `Source` interface (list, read range) and its S3 implementation.
- `fetch`: the transfer engine (parallel, verified, staged copies).
- `store`: the on-disk cache (versioned dataset directories, atomic publish, scan on start).
- `runner`: the level-triggered loop talking to the coordinator.
"""
