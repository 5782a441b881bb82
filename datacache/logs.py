"""Logging set-up shared by the agent and the coordinator.

One JSON object per line on stderr (`ts`, `level`, `logger`, `msg`, plus `node`, `dataset`,
`version` and `err` where they apply), or readable text when stderr is a terminal. Structured
fields are passed with `extra={"dataset": ...}`; the node name is attached to every record.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

LogFormat = Literal["json", "text", "auto"]

# Fields copied from `extra=` into the output, in this order.
STRUCTURED_FIELDS = ("node", "dataset", "version", "peer", "object", "err")


class _NodeFilter(logging.Filter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self._node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if self._node and not hasattr(record, "node"):
            record.node = self._node
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in STRUCTURED_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{field}={getattr(record, field)}"
            for field in STRUCTURED_FIELDS
            if getattr(record, field, None) is not None
        ]
        return f"{text} {' '.join(extras)}" if extras else text


def configure(level: str = "info", fmt: LogFormat = "auto", node: str = "") -> None:
    """Configures the root logger; safe to call more than once."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_NodeFilter(node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # botocore logs request details (including headers) at DEBUG; keep credentials out of logs.
    for noisy in ("botocore", "boto3", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
