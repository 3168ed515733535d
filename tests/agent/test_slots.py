"""ModelStore on a real directory: each installer phase, re-run, and its crash windows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_health import WEIGHTS, Bundle, make_bundle

from agent.errors import ArtifactError, InstallError
from agent.updater.slots import ModelStore


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("bundles")
    return {v: make_bundle(root / v, version=v, weights=WEIGHTS * (i + 1))
            for i, v in enumerate(("1", "2", "3"))}


class Hook:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, Path | None]] = []

    def __call__(self, name: str, version: str | None, path: Path | None) -> None:
        self.calls.append((name, version, path))


@pytest.fixture
def hook() -> Hook:
    return Hook()


@pytest.fixture
def store(tmp_path: Path, hook: Hook) -> ModelStore:
    return ModelStore(tmp_path, on_activate=hook)


def stage(store: ModelStore, b: Bundle) -> Path:
    return store.stage("clf", b.manifest.version, b.model_file, b.manifest_bytes)


def pointers(store: ModelStore) -> tuple[str | None, str | None]:
    return store.current("clf"), store.previous("clf")


def test_capabilities() -> None:
    assert ModelStore.supports_rollback is True and ModelStore.needs_restart is False


def test_stage_installs_a_complete_version_and_is_idempotent(store: ModelStore,
                                                             bundles: dict[str, Bundle]) -> None:
    path = stage(store, bundles["1"])
    assert path == store.root / "clf" / "1"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]
    assert store.is_complete("clf", "1")
    inode = (path / "model.onnx").stat().st_ino
    assert stage(store, bundles["1"]) == path  # again: the complete copy is kept
    assert (path / "model.onnx").stat().st_ino == inode
    assert store.versions("clf") == ["1"] and pointers(store) == (None, None)
    assert [p.name for p in (store.root / "clf").iterdir()] == ["1"]  # no temporaries


def test_stage_replaces_a_partial_version_left_by_a_crash(store: ModelStore,
                                                          bundles: dict[str, Bundle]) -> None:
    partial = store.root / "clf" / "1"
    partial.mkdir(parents=True)
    (partial / "model.onnx").write_bytes(b"half")
    stage(store, bundles["1"])
    assert store.is_complete("clf", "1")
    assert sorted(p.name for p in (store.root / "clf").iterdir()) == ["1"]


def test_stage_checks_the_copy_against_the_manifest(store: ModelStore,
                                                    bundles: dict[str, Bundle]) -> None:
    with pytest.raises(InstallError, match=r"the copy is \d+ bytes with sha256 .* the manifest "
                                           r"says"):
        store.stage("clf", "1", bundles["2"].model_file, bundles["1"].manifest_bytes)
    assert not (store.root / "clf" / "1").exists()
    assert list((store.root / "clf").iterdir()) == []  # the temporary is gone


def test_stage_refuses_a_manifest_for_another_model(store: ModelStore,
                                                    bundles: dict[str, Bundle]) -> None:
    with pytest.raises(ArtifactError, match="the manifest is for clf 1"):
        store.stage("clf", "2", bundles["1"].model_file, bundles["1"].manifest_bytes)
    with pytest.raises(ArtifactError, match="invalid manifest"):
        store.stage("clf", "1", bundles["1"].model_file, b"{}")


def test_stage_never_replaces_the_current_version_in_place(store: ModelStore,
                                                           bundles: dict[str, Bundle]) -> None:
    stage(store, bundles["1"])
    store.activate("clf", "1")
    (store.root / "clf" / "1" / "model.onnx").write_bytes(b"corrupted")
    with pytest.raises(InstallError, match="in use; refusing to replace it in place"):
        stage(store, bundles["1"])


def test_activate_swaps_pointers_and_calls_the_hook(store: ModelStore, hook: Hook,
                                                    bundles: dict[str, Bundle]) -> None:
    stage(store, bundles["1"])
    stage(store, bundles["2"])
    store.activate("clf", "1")
    assert pointers(store) == ("1", None)
    store.activate("clf", "2")
    assert pointers(store) == ("2", "1")
    store.activate("clf", "2")  # again: pointers unchanged, serving told again (idempotent)
    assert pointers(store) == ("2", "1")
    d = store.root / "clf"
    assert hook.calls == [("clf", "1", d / "1"), ("clf", "2", d / "2"), ("clf", "2", d / "2")]
    assert os.readlink(d / "current") == "2"  # relative: the data dir may move
    assert (d / "current").resolve() == (d / "2").resolve()
    assert sorted(p.name for p in d.iterdir()) == ["1", "2", "current", "previous"]


def test_activate_after_a_crash_between_the_two_pointer_swaps(store: ModelStore,
                                                              bundles: dict[str, Bundle]) -> None:
    for v in ("1", "2"):
        stage(store, bundles[v])
    store.activate("clf", "1")
    os.symlink("1", store.root / "clf" / "previous")  # died after previous := old current
    store.activate("clf", "2")
    assert pointers(store) == ("2", "1")


def test_activate_refuses_an_unstaged_version(store: ModelStore) -> None:
    with pytest.raises(InstallError, match="cannot be read"):
        store.activate("clf", "9")
    assert pointers(store) == (None, None)


def test_rollback_is_idempotent_and_guarded_by_from_version(store: ModelStore, hook: Hook,
                                                            bundles: dict[str, Bundle]) -> None:
    for v in ("1", "2"):
        stage(store, bundles[v])
    store.activate("clf", "1")
    store.activate("clf", "2")
    hook.calls.clear()
    assert store.rollback("clf", from_version="3") == "2"  # not current: nothing happens
    assert store.rollback("clf", from_version="2") == "1"
    assert pointers(store) == ("1", "1")
    assert store.rollback("clf", from_version="2") == "1"  # again: a no-op
    assert store.rollback("clf") == "1"  # current == previous: nothing to go back to
    assert hook.calls == [("clf", "1", store.root / "clf" / "1")]


def test_rollback_of_a_first_install_leaves_no_model(store: ModelStore, hook: Hook,
                                                     bundles: dict[str, Bundle]) -> None:
    stage(store, bundles["1"])
    store.activate("clf", "1")
    assert store.rollback("clf", from_version="1") is None
    assert pointers(store) == (None, None)
    assert hook.calls[-1] == ("clf", None, None)
    assert store.rollback("clf", from_version="1") is None


def test_commit_checks_the_current_version(store: ModelStore,
                                           bundles: dict[str, Bundle]) -> None:
    with pytest.raises(InstallError, match="no current version"):
        store.commit("clf")
    stage(store, bundles["1"])
    store.activate("clf", "1")
    assert store.commit("clf") == "1"
    assert store.commit("clf") == "1"
    (store.root / "clf" / "1" / "model.onnx").write_bytes(b"bit rot")
    with pytest.raises(InstallError, match="do not match its manifest"):
        store.commit("clf")


def test_cleanup_keeps_current_previous_and_kept(store: ModelStore,
                                                 bundles: dict[str, Bundle]) -> None:
    for v in ("1", "2", "3"):
        stage(store, bundles[v])
    store.activate("clf", "1")
    store.activate("clf", "2")
    d = store.root / "clf"
    (d / ".stage-4-deadbeef").mkdir()
    os.symlink("3", d / ".link-current-cafe")
    assert store.cleanup("clf", keep=["3"]) == [".link-current-cafe", ".stage-4-deadbeef"]
    assert store.versions("clf") == ["1", "2", "3"]
    assert store.cleanup("clf") == ["3"]
    assert store.cleanup("clf") == []
    assert store.versions("clf") == ["1", "2"]
    assert store.cleanup("other") == []


def test_model_path_and_manifest(store: ModelStore, bundles: dict[str, Bundle]) -> None:
    stage(store, bundles["1"])
    assert store.model_path("clf", "1") == store.root / "clf" / "1" / "model.onnx"
    assert store.manifest("clf", "1") == bundles["1"].manifest


@pytest.mark.parametrize(("name", "version"), [("../x", "1"), ("clf", "current"),
                                               ("clf", "previous"), ("clf", ".hidden")],
                         ids=["traversal", "current", "previous", "hidden"])
def test_names_that_are_not_plain_are_refused(store: ModelStore, name: str,
                                              version: str) -> None:
    with pytest.raises(ValueError, match="not a plain"):
        store.version_dir(name, version)


def test_manifest_is_parsed_once_per_file_and_again_when_the_file_changes(
        tmp_path: Path) -> None:
    """The cache is keyed on the file's identity: a rewritten manifest is read afresh."""
    from agent.protocol.manifest import MANIFEST_FILE, Manifest

    bundle = make_bundle(tmp_path / "src", name="m", version="1")
    store = ModelStore(tmp_path / "data")
    store.stage("m", "1", bundle.model_file, bundle.manifest_bytes)
    path = store.version_dir("m", "1") / MANIFEST_FILE
    first = store.manifest("m", "1")
    assert store.manifest("m", "1") is first  # parsed once
    changed = Manifest.from_dict({**first.to_dict(), "lineage": {"note": "rewritten"}})
    path.write_bytes(changed.to_bytes())
    os.utime(path, ns=(1, 1))  # a different identity even where mtimes are coarse
    assert store.manifest("m", "1").lineage == {"note": "rewritten"}
