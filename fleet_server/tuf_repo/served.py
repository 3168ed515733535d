"""The repository's public files in memory, for the HTTP routes that serve them to devices.

Every device reads ``timestamp.json`` and a few other files on every update, so a rollout to a
thousand devices reads the same handful of small files thousands of times. :class:`ServedFiles`
keeps their bytes in memory and re-validates them with one ``stat`` per request against the
identity they were read with (device, inode, size, mtime). That is exact, not a time-to-live:
the repository replaces metadata with ``os.replace`` (a new inode) and never rewrites a target
in place (target names are content-addressed), so a changed file never matches a cached
identity, whichever process changed it (``fleet_server keys rotate`` runs outside the server).
A file is read through one descriptor (``fstat`` then ``read``), so bytes and identity always
belong together.

Bounded: files over ``max_file_bytes`` are not cached (stream them from disk), and the least
recently served files are dropped once ``max_total_bytes`` is exceeded. Thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

__all__ = ["ServedFiles"]

_Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ServedFiles:
    """Small public files as bytes, re-validated by ``stat``; see the module docstring."""

    def __init__(self, *, max_file_bytes: int = 4 << 20, max_total_bytes: int = 64 << 20
                 ) -> None:
        if not 0 < max_file_bytes <= max_total_bytes:
            raise ValueError(f"ServedFiles: expected 0 < max_file_bytes <= max_total_bytes, "
                             f"got {max_file_bytes} and {max_total_bytes}")
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._files: OrderedDict[Path, tuple[_Identity, bytes]] = OrderedDict()
        self._total = 0
        self.reads = 0  # files read from disk (cache fills), for tests and benchmarks

    def cached(self, path: Path) -> bytes | None:
        """The bytes of ``path`` if the cached copy is still the file on disk, else ``None``
        (call :meth:`load`, or stream a file over ``max_file_bytes``). One ``stat``, no read:
        cheap enough for an event loop thread.

        Raises:
            OSError: ``path`` cannot be stat'ed (e.g. ``FileNotFoundError``).
        """
        ident = _identity(os.stat(path))
        with self._lock:
            entry = self._files.get(path)
            if entry is None or entry[0] != ident:
                return None
            self._files.move_to_end(path)
            return entry[1]

    def load(self, path: Path) -> bytes:
        """Read ``path``, and cache it unless it is larger than ``max_file_bytes``. Blocking
        I/O: call it off the event loop.

        Raises:
            OSError: ``path`` cannot be read, or is not a regular file.
        """
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
        if len(data) > self.max_file_bytes:
            return data
        with self._lock:
            self.reads += 1
            old = self._files.pop(path, None)
            if old is not None:
                self._total -= len(old[1])
            self._files[path] = (_identity(st), data)
            self._total += len(data)
            while self._total > self.max_total_bytes:
                _, (_, dropped) = self._files.popitem(last=False)
                self._total -= len(dropped)
        return data
