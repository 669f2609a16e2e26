"""The scan cache: what was learnt about each file (SHA-256, family, kind, rank ...), keyed by its path and kept
while its size and modification time stay the same. One JSON file, written atomically; a cache that cannot be
read is started afresh (it only costs time)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic

CACHE_VERSION = 1


def autov2(sha256: str | None) -> str | None:
    """A1111's short hash ("AutoV2"): the first 10 hex digits of the file's SHA-256."""
    return sha256[:10] if sha256 else None


def file_key(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns]


class ScanCache:
    """Entries are keyed by the absolute path, so relative folders given from another working folder still hit.
    ``get(path, stat)`` gives what was stored for the file when its size and mtime still match;
    ``put`` stores it (a second scan through the same object then hits); ``note`` adds a fact learnt later (a
    Civitai 404); ``save()`` writes the entries seen in this scan (files gone since are dropped)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path).expanduser() if path else None
        self._old: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                data = None
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                self._old = data["files"]
        self.hits = 0
        self.misses = 0
        self._dirty = False

    def get(self, path: Path, stat: os.stat_result) -> dict[str, Any] | None:
        entry = self._old.get(os.path.abspath(path))
        if isinstance(entry, dict) and entry.get("key") == file_key(stat) and isinstance(entry.get("data"), dict):
            self._new[os.path.abspath(path)] = entry
            self.hits += 1
            return entry["data"]
        self.misses += 1
        return None

    def put(self, path: Path, stat: os.stat_result, data: dict[str, Any]) -> None:
        entry = {"key": file_key(stat), "data": data}
        self._new[os.path.abspath(path)] = self._old[os.path.abspath(path)] = entry  # a rescan by this object hits
        self._dirty = True

    def data_of(self, path: Path) -> dict[str, Any] | None:
        """What this scan stored or found for ``path`` (None when the scan did not see it)."""
        entry = self._new.get(os.path.abspath(path))
        return entry["data"] if entry is not None else None

    def note(self, path: Path, name: str, value: Any) -> None:
        """Add ``name: value`` to what is kept for a file this scan saw (kept while the file stays the same)."""
        key = os.path.abspath(path)
        entry = self._new.get(key)
        if entry is not None:
            self._new[key] = self._old[key] = {"key": entry["key"], "data": {**entry["data"], name: value}}
            self._dirty = True

    def save(self) -> None:
        if self.path is None or (self._new == self._old and self.path.is_file() and not self._dirty):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"version": CACHE_VERSION, "files": self._new}, sort_keys=True))
        self._dirty = False
