"""The on-disk cache of one node.

Layout under the cache root:

    cache-id                          random id written once: identifies this disk's cache
    staging/<dataset>.<tag>/          a copy in progress (tag: hash of the source URI)
    staging/<dataset>.<tag>.journal   files of that copy already verified (for resuming)
    datasets/<dataset>/<version>/     published, verified files of one version
    datasets/<dataset>/<version>.json its manifest (written after the files, before `current`)
    datasets/<dataset>/current        symlink to <version>: what pods read
    index.sqlite                      the local index (`agent.index`), rebuilt from the above

Publishing renames the staged directory into place, writes the manifest, then atomically
replaces `current`, fsyncing each directory touched, so after a crash a dataset either has a
complete verified version behind `current` or is treated as absent. Deleting removes `current`
first, so nothing half-deleted is ever published.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StoreError
from agent.manifest import Manifest
from datacache.validation import InvalidInput, split_dataset_name, validate_dataset_name

log = logging.getLogger(__name__)

CURRENT = "current"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _unlink_planted(path: Path) -> None:
    """Removes a symbolic link at `path` (only the link: its target is left alone)."""
    if path.is_symlink():
        log.warning("Removing a symbolic link planted in the cache at %s", path)
        path.unlink()


@dataclass(frozen=True)
class Usage:
    capacity_bytes: int
    free_bytes: int


def _flat(name: str) -> str:
    """A canonical dataset name as one path component: namespaces contain no dots, so
    "<namespace>.<name>" is unambiguous."""
    namespace, short = split_dataset_name(name)
    return f"{namespace}.{short}"


class CacheStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "staging"
        self.datasets = root / "datasets"
        for directory in (root, self.staging, self.datasets):
            directory.mkdir(parents=True, exist_ok=True)
        self.cache_id = self._load_cache_id()

    def _load_cache_id(self) -> str:
        path = self.root / "cache-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            cache_id = uuid.uuid4().hex
            _write_atomic(path, cache_id + "\n")
            return cache_id

    def dataset_dir(self, name: str) -> Path:
        namespace, short = split_dataset_name(name)
        return self.datasets / namespace / short

    def current_path(self, name: str) -> Path:
        """Where pods read the dataset's current version."""
        return self.dataset_dir(name) / CURRENT

    def recover(self) -> dict[str, Manifest]:
        """Returns every published dataset with its manifest, removing unpublished leftovers.
        Staging copies are kept for resuming (see `prune_staging`)."""
        found: dict[str, Manifest] = {}
        for entry in self._dataset_dirs():
            name = f"{entry.parent.name}/{entry.name}"
            manifest = self._load_current(entry, name)
            if manifest is None:
                log.warning("Removing unpublished copy", extra={"dataset": name})
                self.delete(name)
            else:
                found[name] = manifest
                self._remove_other_versions(entry, manifest.version)
        return found

    def _dataset_dirs(self) -> list[Path]:
        """datasets/<namespace>/<name> directories, skipping (and logging) anything else."""
        out = []
        for namespace in sorted(self.datasets.iterdir()):
            if not namespace.is_dir() or namespace.is_symlink():
                log.warning("Ignoring unexpected entry %s in the cache", namespace)
                continue
            for entry in sorted(namespace.iterdir()):
                try:
                    validate_dataset_name(f"{namespace.name}/{entry.name}")
                except InvalidInput:
                    log.warning("Ignoring unexpected entry %s in the cache", entry)
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    out.append(entry)
        return out

    def _load_current(self, directory: Path, name: str) -> Manifest | None:
        current = directory / CURRENT
        try:
            version = os.readlink(current)
        except OSError:
            return None
        if "/" in version or version in ("", ".", ".."):
            return None
        try:
            manifest = Manifest.from_json((directory / f"{version}.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Manifest unreadable: %s", exc, extra={"dataset": name})
            return None
        if manifest.version != version or manifest.dataset != name:
            return None
        if not (directory / version).is_dir():
            return None
        return manifest

    def version_dir(self, manifest: Manifest) -> Path:
        return self.dataset_dir(manifest.dataset) / manifest.version

    def rewrite_manifest(self, manifest: Manifest) -> None:
        """Replaces the manifest of a published version by one with the same files (a new
        revision whose content did not change). The files and `current` stay as they are."""
        directory = self.dataset_dir(manifest.dataset)
        if not (directory / manifest.version).is_dir():
            raise StoreError(f"{manifest.dataset}: version {manifest.version} is not on disk")
        try:
            _write_atomic(directory / f"{manifest.version}.json", manifest.to_json())
        except OSError as exc:
            raise StoreError(f"rewriting the manifest of {manifest.dataset}: {exc}") from exc

    def staged_bytes(self, name: str | None = None) -> int:
        """Bytes on disk of the copies of `name` in staging (all datasets' for None)."""
        total = 0
        for leftover in self.staging.iterdir():
            if not leftover.is_dir():
                continue
            if name is not None and leftover.name.rsplit(".", 1)[0] != _flat(name):
                continue
            for dirpath, _, filenames in os.walk(leftover):
                for filename in filenames:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, filename)).st_blocks * 512
        return total

    def staging_for(self, name: str, source: str) -> tuple[Path, Path]:
        """The staging directory and resume journal of copying `source` into dataset `name`:
        the same on every attempt, so an interrupted copy resumes where it stopped."""
        tag = hashlib.sha256(source.encode()).hexdigest()[:12]
        path = self.staging / f"{_flat(name)}.{tag}"
        path.mkdir(exist_ok=True)
        return path, self.staging / f"{path.name}.journal"

    def discard_staging(self, name: str) -> None:
        for leftover in self.staging.iterdir():
            # Staging names are "<namespace>.<name>.<tag>[.journal]"; names may contain dots.
            if leftover.name.removesuffix(".journal").rsplit(".", 1)[0] == _flat(name):
                _remove(leftover)

    def prune_staging(self, keep: set[str]) -> None:
        """Removes staging copies of datasets not in `keep` (no longer desired)."""
        flat_keep = {_flat(name) for name in keep}
        for leftover in self.staging.iterdir():
            if leftover.name.removesuffix(".journal").rsplit(".", 1)[0] not in flat_keep:
                _remove(leftover)

    def publish(self, staged: Path, manifest: Manifest) -> Path:
        """Moves a fully written and fsynced staging directory into place as the current
        version of its dataset. Returns the path pods read."""
        directory = self.dataset_dir(manifest.dataset)
        try:
            # The cache never creates links here: one planted in place of a namespace, dataset
            # or version directory would send the copy (and pods' reads) outside the cache.
            _unlink_planted(directory.parent)
            if not directory.parent.exists():
                directory.parent.mkdir()
                _fsync_dir(self.datasets)
            _unlink_planted(directory)
            directory.mkdir(exist_ok=True)
            _fsync_dir(directory.parent)
            target = directory / manifest.version
            _unlink_planted(target)
            if target.exists():
                # Same content already published (a re-fetch of an unchanged source).
                shutil.rmtree(staged)
            else:
                os.rename(staged, target)
            _write_atomic(directory / f"{manifest.version}.json", manifest.to_json())
            link_tmp = directory / f".{CURRENT}.{secrets.token_hex(4)}"
            os.symlink(manifest.version, link_tmp)
            os.replace(link_tmp, directory / CURRENT)
            _fsync_dir(directory)
        except OSError as exc:
            raise StoreError(f"publishing {manifest.dataset}: {exc}") from exc
        self._remove_other_versions(directory, manifest.version)
        return directory / CURRENT

    def _remove_other_versions(self, directory: Path, keep: str) -> None:
        for entry in directory.iterdir():
            if entry.name in (keep, f"{keep}.json", CURRENT):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        """Unpublishes, then removes every version of a dataset and its staging copies."""
        directory = self.dataset_dir(name)
        with contextlib.suppress(FileNotFoundError):
            (directory / CURRENT).unlink()
            _fsync_dir(directory)
        shutil.rmtree(directory, ignore_errors=True)
        self.discard_staging(name)
        if directory.exists():
            raise StoreError(f"could not remove {directory}")

    def usage(self) -> Usage:
        """The filesystem's size and free space (see `agent.capacity` for the quota)."""
        total, _, free = shutil.disk_usage(self.root)
        return Usage(capacity_bytes=total, free_bytes=free)
