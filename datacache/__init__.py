"""datacache: a node-local dataset cache for Kubernetes.

This top-level package holds what the agent, the coordinator and users share: the generated
API (`datacache.v1`), input validation, logging set-up and the `datacache` command line. It
never imports `agent` or `coordinator` (an import-linter contract enforces it).
"""

__version__ = "0.1.0"
