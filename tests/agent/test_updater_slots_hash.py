"""ModelStore's completeness check trusts the hash staging computed only for the very file it
wrote: same path and stat identity, in the same process. Any rewrite or replacement, and any
new process (a restart), hashes the file in full again."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_health import WEIGHTS, Bundle, make_bundle

from agent.errors import InstallError
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
        tmp_path: Path, bundle: Bundle) -> None:
    store, model = _staged(tmp_path, bundle)
    st = model.stat()
    _flip_last_byte(model)  # same inode and size; the mtime put back: the same identity
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.is_complete("clf", "1")  # not read again: the copy's own hash stands
    assert not ModelStore(tmp_path).is_complete("clf", "1")  # after a restart: full hash


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
