"""When pods last read a dataset, as far as the node can tell: the newest access time among
its files. The coordinator evicts least recently used datasets first.

Most filesystems are mounted `relatime`: a read updates the access time only when it is older
than the modification time or more than a day old. So the answer is exact to about a day after
the first read, which is what eviction order needs; on `noatime` mounts no read ever shows,
and the publish time stands in. The scrub reads with O_NOATIME so it never looks like a pod.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

SAMPLE_FILES = 256
"""At most this many files are looked at per dataset and pass (a stat each)."""


def newest(atimes: Iterable[float], published_at: float) -> float:
    """The last use: the newest access time, never before the publish time."""
    return max([published_at, *atimes])


def sample(paths: Sequence[str], limit: int = SAMPLE_FILES) -> list[str]:
    """Up to `limit` paths spread evenly over the list (pods usually read whole datasets, so
    any spread of files sees a read soon)."""
    if len(paths) <= limit:
        return list(paths)
    step = len(paths) / limit
    return [paths[int(i * step)] for i in range(limit)]


def atimes(version_dir: Path, paths: Sequence[str]) -> list[float]:
    """Access times of those files that exist, not following symlinks."""
    out = []
    for path in paths:
        try:
            out.append(os.lstat(version_dir / path).st_atime)
        except OSError:
            continue
    return out
