"""TufRepository against a real tuf.ngclient.Updater over real HTTP on loopback.

Devices start from ONLY the version-1 root (as provisioned) and must follow every later
change. ngclient checks expiry against the wall clock, so repositories that devices read are
created at the real time (or deliberately in the past); nothing here sleeps.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater, UpdaterConfig

from fleet_server import tuf_repo
from fleet_server.errors import FleetError, TrustError
from fleet_server.tuf_repo import (
    ExpiryPolicy,
    KeyStoreError,
    RepositoryCorruptError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    TargetConflictError,
    TargetNameError,
    TargetSourceError,
    TufRepository,
    public_key_pem,
    roles_to_refresh,
    validate_target_name,
)

FIXED_NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
MODEL_A = "models/digits/1.0.0/rpi4/model.onnx"
MANIFEST_A = "models/digits/1.0.0/rpi4/manifest.json"
MODEL_B = "models/digits/1.1.0/rpi4/model.onnx"
MODEL_C = "models/faces/2.0.0/jetson-nano/model.tflite"


def _content(tag: str, size: int = 4096) -> bytes:
    return (tag.encode() * (size // len(tag) + 1))[:size]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def wall_now() -> datetime:
    """The real time, read once: ngclient itself judges expiry by the wall clock."""
    return datetime.now(UTC)


@dataclass
class Device:
    """A provisioned device: a pinned v1 root and an independent tuf.ngclient Updater."""

    home: Path
    base_url: str
    pinned_root: bytes
    bootstrap: bool = True  # pass the pinned root as bytes, else rely on cached root.json
    downloads: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        (self.home / "metadata").mkdir(parents=True)
        (self.home / "targets").mkdir()
        (self.home / "metadata" / "root.json").write_bytes(self.pinned_root)

    def updater(self) -> Updater:
        return Updater(
            metadata_dir=str(self.home / "metadata"),
            metadata_base_url=f"{self.base_url}/metadata/",
            target_base_url=f"{self.base_url}/targets/",
            target_dir=str(self.home / "targets"),
            config=UpdaterConfig(prefix_targets_with_hash=True),
            bootstrap=self.pinned_root if self.bootstrap else None,
        )

    def fetch(self, names: list[str] | tuple[str, ...]) -> dict[str, bytes]:
        updater = self.updater()
        updater.refresh()
        out = {}
        for name in names:
            info = updater.get_targetinfo(name)
            assert info is not None, f"{name} is not in the device's verified targets"
            out[name] = Path(updater.download_target(info)).read_bytes()
            self.downloads += 1
        return out

    def trusted_root_version(self) -> int:
        root = Metadata[Root].from_file(str(self.home / "metadata" / "root.json"))
        return root.signed.version


@dataclass
class Fleet:
    repo: TufRepository
    base_url: str
    pinned_root: bytes
    tmp: Path
    _n: int = 0

    def device(self, *, bootstrap: bool = True) -> Device:
        self._n += 1
        return Device(self.tmp / f"device{self._n}", self.base_url, self.pinned_root, bootstrap)

    def push(self, name: str, content: bytes, *, now: datetime, replace: bool = False) -> None:
        src = self.tmp / "src.bin"
        src.write_bytes(content)
        self.repo.add_target(name, src, now=now, replace=replace)


@pytest.fixture
def make_fleet(tmp_path: Path, serve: Callable[[Path], str]) -> Callable[..., Fleet]:
    def _make(now: datetime, expiry: ExpiryPolicy | None = None) -> Fleet:
        repo = TufRepository.create(tmp_path / "server", now=now, expiry=expiry)
        return Fleet(repo, serve(repo.public_dir), repo.root_bytes(1), tmp_path)

    return _make


def _key_files(repo: TufRepository) -> set[str]:
    return {p.stem for p in (repo.data_dir / "keys").glob("*.pem")}


# --------------------------------------------------------------------------- pure core

_EXPIRES_FRESH = {
    "targets": FIXED_NOW + timedelta(days=60),
    "snapshot": FIXED_NOW + timedelta(days=5),
    "timestamp": FIXED_NOW + timedelta(hours=20),
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, set()),
        ({"timestamp": FIXED_NOW + timedelta(hours=7)}, set()),
        ({"timestamp": FIXED_NOW + timedelta(hours=6)}, {"timestamp"}),
        ({"timestamp": FIXED_NOW + timedelta(hours=1)}, {"timestamp"}),
        ({"timestamp": FIXED_NOW - timedelta(days=3)}, {"timestamp"}),
        ({"snapshot": FIXED_NOW + timedelta(days=1)}, {"snapshot", "timestamp"}),
        ({"targets": FIXED_NOW + timedelta(days=13)}, {"targets", "snapshot", "timestamp"}),
        ({"targets": FIXED_NOW - timedelta(days=1)}, {"targets", "snapshot", "timestamp"}),
    ],
    ids=[
        "all-fresh",
        "timestamp-just-outside-margin",
        "timestamp-exactly-at-margin",
        "timestamp-inside-margin",
        "timestamp-long-expired",
        "snapshot-due-drags-timestamp",
        "targets-due-drags-all",
        "targets-expired",
    ],
)
def test_roles_to_refresh(overrides: dict[str, datetime], expected: set[str]) -> None:
    expires = {**_EXPIRES_FRESH, **overrides}
    assert roles_to_refresh(expires, FIXED_NOW, ExpiryPolicy()) == expected


def test_roles_to_refresh_rejects_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        roles_to_refresh(_EXPIRES_FRESH, FIXED_NOW.replace(tzinfo=None), ExpiryPolicy())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timestamp": timedelta(0)},
        {"root": timedelta(days=-1)},
        {"timestamp_margin": timedelta(days=1)},
        {"snapshot_margin": timedelta(days=8)},
        {"targets_margin": timedelta(seconds=-1)},
    ],
    ids=[
        "zero-lifetime",
        "negative-lifetime",
        "margin-equals-lifetime",
        "margin-too-long",
        "negative-margin",
    ],
)
def test_expiry_policy_rejects_nonsense(kwargs: dict[str, timedelta]) -> None:
    with pytest.raises(ValueError):
        ExpiryPolicy(**kwargs)


BAD_NAMES = [
    pytest.param("", "empty", id="empty"),
    pytest.param("../etc/passwd", "'..' segment", id="dotdot-leading"),
    pytest.param("models/../../keys/x.pem", "'..' segment", id="dotdot-inside"),
    pytest.param("models/./model.onnx", "'.' segment", id="dot-segment"),
    pytest.param("/models/a/model.onnx", "absolute", id="absolute"),
    pytest.param("models\\a\\model.onnx", "backslash", id="backslash"),
    pytest.param("models//model.onnx", "empty segment", id="double-slash"),
    pytest.param("models/a/", "empty segment", id="trailing-slash"),
    pytest.param("models/.hidden", "must match", id="hidden-file"),
    pytest.param("models/a b/model.onnx", "must match", id="space"),
    pytest.param("models/a?x=1", "must match", id="url-query"),
    pytest.param("models/%2e%2e/x", "must match", id="percent-encoding"),
    pytest.param("C:/models/x", "must match", id="drive-letter"),
    pytest.param("models/x\n", "must match", id="trailing-newline"),
    pytest.param("m/" + "x" * 600, "at most", id="too-long"),
]


@pytest.mark.parametrize(("name", "why"), BAD_NAMES)
def test_validate_target_name_rejects(name: str, why: str) -> None:
    with pytest.raises(TargetNameError, match=why):
        validate_target_name(name)


@pytest.mark.parametrize(
    "name",
    [MODEL_A, MANIFEST_A, "a", "models/x_y/2.0.0+build.1/jetson-nano/model.tflite"],
    ids=["model", "manifest", "single-segment", "semver-build"],
)
def test_validate_target_name_accepts(name: str) -> None:
    assert validate_target_name(name) == name


def test_public_surface_is_exported() -> None:
    for name in tuf_repo.__all__:
        assert hasattr(tuf_repo, name), name
    assert issubclass(TrustError, FleetError)
    for exc in (KeyStoreError, RepositoryExistsError, TargetConflictError, TargetNameError):
        assert issubclass(exc, TrustError)


# --------------------------------------------------------------------------- on disk


def test_create_writes_consistent_snapshot_layout_with_safe_permissions(tmp_path: Path) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    md = repo.metadata_dir
    for name in ("1.root.json", "root.json", "timestamp.json", "1.snapshot.json", "1.targets.json"):
        assert stat.S_IMODE((md / name).stat().st_mode) == 0o644, name
    root = Metadata[Root].from_bytes(repo.root_bytes())
    assert root.signed.consistent_snapshot is True
    assert {r: len(root.signed.roles[r].keyids) for r in root.signed.roles} == {
        "root": 1,
        "targets": 1,
        "snapshot": 1,
        "timestamp": 1,
    }
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    assert repo.expires() == {
        "root": FIXED_NOW + timedelta(days=365),
        "targets": FIXED_NOW + timedelta(days=90),
        "snapshot": FIXED_NOW + timedelta(days=7),
        "timestamp": FIXED_NOW + timedelta(days=1),
    }
    key_dir = repo.data_dir / "keys"
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert len(_key_files(repo)) == 4
    for pem in key_dir.iterdir():
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600, pem.name
    # nothing secret is under the served directory
    for served in repo.public_dir.rglob("*"):
        if served.is_file():
            assert b"PRIVATE KEY" not in served.read_bytes(), served


@pytest.mark.parametrize(
    "prepare",
    [
        lambda d: TufRepository.create(d, now=FIXED_NOW),
        lambda d: (d.mkdir(), (d / "other.db").write_bytes(b"x")),
        lambda d: d.write_bytes(b"not a directory"),
    ],
    ids=["repository-exists", "unrelated-files", "path-is-a-file"],
)
def test_create_refuses_existing(tmp_path: Path, prepare: Callable[[Path], object]) -> None:
    target = tmp_path / "server"
    prepare(target)
    with pytest.raises(RepositoryExistsError):
        TufRepository.create(target, now=FIXED_NOW)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".creating")] == []


def test_create_accepts_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    assert repo.versions()["root"] == 1


def test_open_without_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        TufRepository.open(tmp_path)


def test_open_detects_tampered_metadata(tmp_path: Path) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    _flip_signature(repo.metadata_dir / "timestamp.json")
    with pytest.raises(RepositoryCorruptError, match=r"timestamp\.json fails verification"):
        TufRepository.open(repo.data_dir)


def test_permissive_private_key_is_refused(tmp_path: Path) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    (tmp_path / "m.onnx").write_bytes(b"model")
    for pem in (repo.data_dir / "keys").iterdir():
        pem.chmod(0o644)
    with pytest.raises(KeyStoreError, match="mode 0644, expected 0600"):
        repo.add_target(MODEL_A, tmp_path / "m.onnx", now=FIXED_NOW)
    with pytest.raises(KeyStoreError):
        TufRepository.open(repo.data_dir)


def test_public_keys_are_exportable(tmp_path: Path) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    keys = repo.public_keys()
    assert set(keys) == {"root", "targets", "snapshot", "timestamp"}
    root = Metadata[Root].from_bytes(repo.root_bytes()).signed
    for role, exported in keys.items():
        (key,) = exported
        assert key["keyid"] == root.roles[role].keyids[0]
        assert key["keytype"] == "ed25519"
        assert "private" not in json.dumps(key)
        load_pem_public_key(public_key_pem(root.get_key(key["keyid"])))


@pytest.mark.parametrize(
    "name", [p.values[0] for p in BAD_NAMES[:8]], ids=[p.id for p in BAD_NAMES[:8]]
)
def test_add_target_refuses_bad_names_without_side_effects(tmp_path: Path, name: str) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    (tmp_path / "m.onnx").write_bytes(b"model")
    with pytest.raises(TargetNameError):
        repo.add_target(name, tmp_path / "m.onnx", now=FIXED_NOW)
    assert repo.versions()["targets"] == 1
    assert [p for p in repo.targets_dir.rglob("*")] == []


def test_add_target_refuses_missing_source(tmp_path: Path) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    with pytest.raises(TargetSourceError):
        repo.add_target(MODEL_A, tmp_path / "nope.onnx", now=FIXED_NOW)
    with pytest.raises(TargetSourceError):
        repo.add_target(MODEL_A, tmp_path, now=FIXED_NOW)


def test_artifacts_are_immutable(tmp_path: Path) -> None:
    repo = TufRepository.create(tmp_path / "server", now=FIXED_NOW)
    src = tmp_path / "m.onnx"
    src.write_bytes(b"v1")
    first = repo.add_target(MODEL_A, src, now=FIXED_NOW)
    assert repo.add_target(MODEL_A, src, now=FIXED_NOW) == first  # identical: no-op
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    src.write_bytes(b"v2")
    with pytest.raises(TargetConflictError, match=f"sha256 {first.sha256}"):
        repo.add_target(MODEL_A, src, now=FIXED_NOW)
    assert repo.targets() == {MODEL_A: first}
    second = repo.add_target(MODEL_A, src, now=FIXED_NOW, replace=True)
    assert repo.targets() == {MODEL_A: second}
    # the old content stays on disk for devices that are mid-download
    assert (repo.targets_dir / first.url_path).read_bytes() == b"v1"
    assert (repo.targets_dir / second.url_path).read_bytes() == b"v2"
    assert not list(repo.targets_dir.glob(".stage.*"))


def test_naive_now_and_unknown_role_are_misuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TufRepository.create(tmp_path / "a", now=datetime(2026, 1, 1))
    repo = TufRepository.create(tmp_path / "b", now=FIXED_NOW)
    with pytest.raises(ValueError, match="unknown role"):
        repo.rotate_key("mirror", now=FIXED_NOW)
    with pytest.raises(ValueError, match="root version"):
        repo.root_bytes(2)


# --------------------------------------------------------------------------- device scenarios


@dataclass(frozen=True)
class Push:
    name: str
    content: bytes
    replace: bool = False


@dataclass(frozen=True)
class Rotate:
    role: str


Step = Push | Rotate

SCENARIOS = [
    pytest.param([Push(MODEL_A, _content("a1"))], id="single-push"),
    pytest.param(
        [
            Push(MODEL_A, _content("a1")),
            Push(MANIFEST_A, b'{"schema_version": 1}'),
            Push(MODEL_B, _content("b1", 100_000)),
            Push(MODEL_C, _content("c1", 1)),
            Push(MODEL_A, _content("a1")),  # same content again: no-op
        ],
        id="pushes-over-time",
    ),
    pytest.param(
        [Push(MODEL_A, _content("a1")), Push(MODEL_A, _content("a2"), replace=True)],
        id="replace-artifact",
    ),
    pytest.param([Push(MODEL_A, b"a"), Rotate("root"), Push(MODEL_B, b"b")], id="rotate-root"),
    pytest.param(
        [Push(MODEL_A, b"a"), Rotate("targets"), Push(MODEL_B, b"b")], id="rotate-targets"
    ),
    pytest.param(
        [Push(MODEL_A, b"a"), Rotate("snapshot"), Push(MODEL_B, b"b")], id="rotate-snapshot"
    ),
    pytest.param(
        [Push(MODEL_A, b"a"), Rotate("timestamp"), Push(MODEL_B, b"b")], id="rotate-timestamp"
    ),
    pytest.param(
        [Push(MODEL_A, b"a"), Rotate("root"), Rotate("root"), Rotate("root"), Push(MODEL_B, b"b")],
        id="rotate-root-three-times",
    ),
    pytest.param(
        [
            Push(MODEL_A, b"a"),
            Rotate("targets"),
            Rotate("snapshot"),
            Rotate("timestamp"),
            Rotate("root"),
            Push(MODEL_B, b"b"),
        ],
        id="rotate-every-role",
    ),
]


@pytest.mark.parametrize("bootstrap", [True, False], ids=["bootstrap-bytes", "cached-root-json"])
@pytest.mark.parametrize("steps", SCENARIOS)
def test_device_follows_repository(
    make_fleet: Callable[..., Fleet], wall_now: datetime, steps: list[Step], bootstrap: bool
) -> None:
    fleet = make_fleet(wall_now)
    repo = fleet.repo
    follower = fleet.device(bootstrap=bootstrap)  # syncs after every step
    expected: dict[str, bytes] = {}
    for step in steps:
        before = repo.versions()
        if isinstance(step, Push):
            fleet.push(step.name, step.content, now=wall_now, replace=step.replace)
            expected[step.name] = step.content
        else:
            old_keyids = set(_root(repo).roles[step.role].keyids)
            new_keyid = repo.rotate_key(step.role, now=wall_now)
            after = repo.versions()
            root = _root(repo)
            assert after["root"] == before["root"] + 1
            assert root.roles[step.role].keyids == [new_keyid]
            assert _key_files(repo) == set(root.keys), "old private key must be deleted"
            assert not old_keyids & _key_files(repo)
            newest = Metadata[Root].from_bytes(repo.root_bytes())
            assert len(newest.signatures) == (2 if step.role == "root" else 1)
        assert follower.fetch(sorted(expected)) == expected
        assert follower.trusted_root_version() == repo.versions()["root"]
    latecomer = fleet.device(bootstrap=bootstrap)  # pinned v1, never saw anything in between
    assert latecomer.fetch(sorted(expected)) == expected
    assert latecomer.trusted_root_version() == repo.versions()["root"]


def test_reopen_from_disk(make_fleet: Callable[..., Fleet], wall_now: datetime) -> None:
    fleet = make_fleet(wall_now)
    fleet.push(MODEL_A, b"a", now=wall_now)
    fleet.repo.rotate_key("targets", now=wall_now)
    reopened = TufRepository.open(fleet.repo.data_dir)
    assert reopened.versions() == fleet.repo.versions()
    assert reopened.targets() == fleet.repo.targets()
    assert reopened.root_bytes() == fleet.repo.root_bytes()
    src = fleet.tmp / "b.onnx"
    src.write_bytes(b"b")
    reopened.add_target(MODEL_B, src, now=wall_now)
    assert fleet.device().fetch([MODEL_A, MODEL_B]) == {MODEL_A: b"a", MODEL_B: b"b"}


# --------------------------------------------------------------------------- attacks


def _root(repo: TufRepository) -> Root:
    return Metadata[Root].from_bytes(repo.root_bytes()).signed


def _flip(path: Path, value: str) -> None:
    """Change one hex digit of ``value`` inside ``path``, keeping the file length."""
    data = path.read_bytes()
    assert value.encode() in data, f"{value} not in {path}"
    flipped = ("1" if value[0] == "0" else "0") + value[1:]
    path.write_bytes(data.replace(value.encode(), flipped.encode(), 1))


def _flip_signature(path: Path) -> None:
    _flip(path, json.loads(path.read_bytes())["signatures"][0]["sig"])


def _current(repo: TufRepository, role: str) -> Path:
    return repo.metadata_dir / f"{repo.versions()[role]}.{role}.json"


def _tamper_target_bytes(repo: TufRepository) -> None:
    path = repo.targets_dir / repo.targets()[MODEL_A].url_path
    path.write_bytes(b"X" * path.stat().st_size)


def _tamper_target_extend(repo: TufRepository) -> None:
    path = repo.targets_dir / repo.targets()[MODEL_A].url_path
    path.write_bytes(path.read_bytes() + b"trailing payload")


def _tamper_target_truncate(repo: TufRepository) -> None:
    path = repo.targets_dir / repo.targets()[MODEL_A].url_path
    path.write_bytes(path.read_bytes()[:-1])


def _tamper_timestamp_signature(repo: TufRepository) -> None:
    _flip_signature(repo.metadata_dir / "timestamp.json")


def _tamper_timestamp_body(repo: TufRepository) -> None:
    path = repo.metadata_dir / "timestamp.json"
    _flip(
        path, json.loads(path.read_bytes())["signed"]["meta"]["snapshot.json"]["hashes"]["sha256"]
    )


def _tamper_snapshot_body(repo: TufRepository) -> None:
    path = _current(repo, "snapshot")
    _flip(path, json.loads(path.read_bytes())["signed"]["meta"]["targets.json"]["hashes"]["sha256"])


def _tamper_targets_body(repo: TufRepository) -> None:
    _flip(_current(repo, "targets"), repo.targets()[MODEL_A].sha256)


def _forge_next_root(repo: TufRepository) -> None:
    """An attacker without the root key publishes 2.root.json with their own keys."""
    evil = CryptoSigner.generate_ed25519()
    root = Root(version=2, expires=datetime.now(UTC) + timedelta(days=30))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(evil.public_key, role)
    md = Metadata(root)
    md.sign(evil)
    (repo.metadata_dir / "2.root.json").write_bytes(md.to_bytes())


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_tamper_target_bytes, tuf_exc.LengthOrHashMismatchError),
        (_tamper_target_truncate, tuf_exc.LengthOrHashMismatchError),
        (_tamper_target_extend, tuf_exc.DownloadLengthMismatchError),
        (_tamper_timestamp_signature, tuf_exc.UnsignedMetadataError),
        (_tamper_timestamp_body, tuf_exc.UnsignedMetadataError),
        (_tamper_snapshot_body, tuf_exc.LengthOrHashMismatchError),
        (_tamper_targets_body, tuf_exc.LengthOrHashMismatchError),
        (_forge_next_root, tuf_exc.UnsignedMetadataError),
    ],
    ids=[
        "target-bytes-changed",
        "target-truncated",
        "target-extended",
        "timestamp-signature-broken",
        "timestamp-signed-body-edited",
        "snapshot-edited",
        "targets-metadata-edited",
        "root-forged-by-attacker",
    ],
)
def test_device_refuses_tampering(
    make_fleet: Callable[..., Fleet],
    wall_now: datetime,
    tamper: Callable[[TufRepository], None],
    expected: type[Exception],
) -> None:
    fleet = make_fleet(wall_now)
    fleet.push(MODEL_A, _content("a1"), now=wall_now)
    assert fleet.device().fetch([MODEL_A]) == {MODEL_A: _content("a1")}
    tamper(fleet.repo)
    device = fleet.device()
    with pytest.raises(expected):
        device.fetch([MODEL_A])
    assert list((device.home / "targets").iterdir()) == []


@pytest.mark.parametrize(
    ("age", "due"),
    [
        (timedelta(days=2), {"timestamp"}),
        (timedelta(days=8), {"snapshot", "timestamp"}),
        (timedelta(days=91), {"targets", "snapshot", "timestamp"}),
    ],
    ids=["timestamp-expired", "snapshot-expired", "targets-expired"],
)
def test_expired_metadata_is_refused_until_refreshed(
    make_fleet: Callable[..., Fleet], wall_now: datetime, age: timedelta, due: set[str]
) -> None:
    past = wall_now - age
    fleet = make_fleet(past)  # a freeze attack looks exactly like this to the device
    fleet.push(MODEL_A, b"a", now=past)
    with pytest.raises(tuf_exc.ExpiredMetadataError):
        fleet.device().fetch([MODEL_A])

    before = fleet.repo.versions()
    assert fleet.repo.refresh_timestamp(wall_now) is True
    after = fleet.repo.versions()
    assert {r for r in after if after[r] != before[r]} == due
    assert fleet.repo.refresh_timestamp(wall_now) is False  # nothing due any more
    assert fleet.device().fetch([MODEL_A]) == {MODEL_A: b"a"}


def test_refresh_timestamp_keeps_device_current_over_time(
    make_fleet: Callable[..., Fleet], wall_now: datetime
) -> None:
    fleet = make_fleet(wall_now - timedelta(hours=20))  # timestamp has 4 h left: in margin
    fleet.push(MODEL_A, b"a", now=wall_now - timedelta(hours=20))
    device = fleet.device()
    assert device.fetch([MODEL_A]) == {MODEL_A: b"a"}
    assert fleet.repo.refresh_timestamp(wall_now) is True
    assert fleet.repo.expires()["timestamp"] == (wall_now + timedelta(days=1)).replace(
        microsecond=0
    )
    assert device.fetch([MODEL_A]) == {MODEL_A: b"a"}


def test_device_refuses_timestamp_rollback(
    make_fleet: Callable[..., Fleet], wall_now: datetime
) -> None:
    fleet = make_fleet(wall_now)
    fleet.push(MODEL_A, b"a", now=wall_now)
    device = fleet.device()
    assert device.fetch([MODEL_A]) == {MODEL_A: b"a"}
    old_timestamp = (fleet.repo.metadata_dir / "timestamp.json").read_bytes()
    fleet.push(MODEL_B, b"b", now=wall_now)
    assert device.fetch([MODEL_A, MODEL_B]) == {MODEL_A: b"a", MODEL_B: b"b"}

    # the mirror serves the older (validly signed, unexpired) timestamp again
    (fleet.repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(tuf_exc.BadVersionNumberError):
        device.fetch([MODEL_A])
