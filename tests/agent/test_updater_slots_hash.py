"""ModelStore's completeness check trusts the hash staging computed only for the very file it
wrote: same path and stat identity (device, inode, size, mtime, ctime), in the same process. A
replacement, a rewrite seen in the timestamps, and any new process (a restart) hash the file in
full again."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_health import WEIGHTS, Bundle, make_bundle

from agent.errors import InstallError
from agent.updater import slots
from agent.updater.slots import ModelStore


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "1", version="1", weights=WEIGHTS)


def _staged(tmp_path: Path, bundle: Bundle) -> tuple[ModelStore, Path]:
    store = ModelStore(tmp_path)
    path = store.stage("clf", "1", bundle.model_file, bundle.manifest_bytes)
    return store, path / "model.onnx"


def _flip_last_byte(model: Path) -> None:
    with open(model, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))


def test_the_staged_hash_stands_for_the_unchanged_file_and_a_new_process_reads_it(
        tmp_path: Path, bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    store, model = _staged(tmp_path, bundle)
    reads: list[Path] = []
    real = slots._hash_file

    def counted(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
        reads.append(path)
        return real(path, chunk)

    monkeypatch.setattr(slots, "_hash_file", counted)
    assert store.is_complete("clf", "1") and reads == []  # the copy's own hash stands
    assert ModelStore(tmp_path).is_complete("clf", "1")  # after a restart: a full hash
    assert reads == [model]


def test_a_same_size_rewrite_with_its_mtime_put_back_is_still_seen(
        tmp_path: Path, bundle: Bundle) -> None:
    """The ctime moves with the write and cannot be set back from user space."""
    store, model = _staged(tmp_path, bundle)
    st = model.stat()
    time.sleep(0.02)  # past the file system's timestamp tick (the ctime is the kernel's)
    _flip_last_byte(model)  # same inode and size
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back
    assert model.stat().st_mtime_ns == st.st_mtime_ns
    assert not store.is_complete("clf", "1")


def _rewrite(model: Path) -> None:
    _flip_last_byte(model)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _replace(model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    tmp = model.with_name("model.tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, model)


def _truncate(model: Path) -> None:
    with open(model, "r+b") as fh:
        fh.truncate(10)


@pytest.mark.parametrize("change", [_rewrite, _replace, _truncate],
                         ids=["rewritten-in-place", "replaced", "truncated"])
def test_a_model_changed_after_staging_is_hashed_again_and_not_committed(
        tmp_path: Path, bundle: Bundle, change: Callable[[Path], None]) -> None:
    store, model = _staged(tmp_path, bundle)
    assert store.is_complete("clf", "1")
    store.activate("clf", "1")
    change(model)
    assert not store.is_complete("clf", "1")
    with pytest.raises(InstallError, match=r"committing clf 1: the installed files do not "
                                           r"match its manifest"):
        store.commit("clf")


def test_a_removed_model_is_incomplete(tmp_path: Path, bundle: Bundle) -> None:
    store, model = _staged(tmp_path, bundle)
    model.unlink()
    assert not store.is_complete("clf", "1")
