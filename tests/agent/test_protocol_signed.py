"""agent.protocol.signed: the signed desired state and the agent's gate in front of it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    DesiredModel,
    DesiredState,
    MessageError,
    canonical_json,
)
from agent.protocol.signed import (
    BadSignature,
    DesiredStateRejected,
    Expired,
    KeyFormatError,
    MalformedEnvelope,
    NotYetValid,
    ReplayedSequence,
    WrongDevice,
    load_private_key_pem,
    load_public_key_pem,
    public_key_id,
    public_key_pem,
    sign_desired,
    trusted_keys_from_pem,
    verify_desired,
)

# fixed keys: no randomness in tests
OLD = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)
NEW = Ed25519PrivateKey.from_private_bytes(bytes([2]) * 32)
STRANGER = Ed25519PrivateKey.from_private_bytes(bytes([3]) * 32)
NOW = 1_800_000_000
SHA = "cd" * 32


def trust(*keys: Ed25519PrivateKey) -> dict[str, Any]:
    return {public_key_id(k): k.public_key() for k in keys}


def state(**changes: Any) -> DesiredState:
    fields: dict[str, Any] = {
        "device_id": "dev-1", "sequence": 10, "issued_at": NOW - 60, "expires_at": NOW + 3600,
        "models": (DesiredModel(name="digits", version="1.0.0",
                                target_path="digits/1.0.0/model.onnx",
                                manifest_target="digits/1.0.0/manifest.json",
                                sha256=SHA, length=4096, profile="rpi4-cpu"),),
    }
    fields.update(changes)
    return DesiredState(**fields)


def envelope(signed: Mapping[str, Any], *keys: Ed25519PrivateKey) -> bytes:
    """Hand-build an envelope over arbitrary ``signed`` content (even content sign_desired
    would refuse to sign)."""
    payload = canonical_json(signed)
    sigs = [{"keyid": public_key_id(k), "sig": k.sign(payload).hex()} for k in keys]
    return json.dumps({"signed": signed, "signatures": sigs}).encode()


def edit(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    data = json.loads(raw)
    change(data)
    return json.dumps(data).encode()


def verify(raw: bytes, **overrides: Any) -> DesiredState:
    kwargs: dict[str, Any] = {"public_keys": trust(OLD), "device_id": "dev-1",
                              "last_sequence": 9, "now": NOW}
    kwargs.update(overrides)
    return verify_desired(raw, **kwargs)


# ---------------------------------------------------------------------------------------------
# accepted
# ---------------------------------------------------------------------------------------------
ACCEPTED: list[tuple[str, Callable[[], bytes], dict[str, Any]]] = [
    ("signed by the trusted key", lambda: sign_desired(state(), OLD), {}),
    ("first state ever", lambda: sign_desired(state(sequence=1), OLD), {"last_sequence": 0}),
    ("rotation: new key, device trusts old and new", lambda: sign_desired(state(), NEW),
     {"public_keys": trust(OLD, NEW)}),
    ("rotation: signed by both, device trusts only old",
     lambda: sign_desired(state(), [OLD, NEW]), {}),
    ("rotation: signed by both, device trusts only new",
     lambda: sign_desired(state(), [OLD, NEW]), {"public_keys": trust(NEW)}),
    ("extra signature by an unknown key is ignored",
     lambda: sign_desired(state(), [STRANGER, OLD]), {}),
    ("trusted key given as raw bytes", lambda: sign_desired(state(), OLD),
     {"public_keys": {public_key_id(OLD): OLD.public_key().public_bytes_raw()}}),
    ("issued within the clock skew", lambda: sign_desired(state(issued_at=NOW + 300), OLD), {}),
    ("one second before expiry", lambda: sign_desired(state(expires_at=NOW + 1), OLD), {}),
    ("empty desired state", lambda: sign_desired(state(models=()), OLD), {}),
    ("re-serialized envelope (whitespace, key order)",
     lambda: json.dumps(json.loads(sign_desired(state(), OLD)), indent=2).encode(), {}),
    ("unknown fields in signed and envelope",
     lambda: edit(envelope(dict(state().to_dict(), x_future=[1, {"a": None}]), OLD),
                  lambda d: d.update(x_envelope=1)), {}),
]


@pytest.mark.parametrize(("make", "overrides"), [r[1:] for r in ACCEPTED],
                         ids=[r[0] for r in ACCEPTED])
def test_accepted(make: Callable[[], bytes], overrides: dict[str, Any]) -> None:
    got = verify(make(), **overrides)
    assert got.device_id == "dev-1"
    assert got.to_bytes() == DesiredState.from_bytes(got.to_bytes()).to_bytes()


def test_unknown_signed_fields_survive_verification() -> None:
    raw = envelope(dict(state().to_dict(), x_future={"k": [1, 2]}), OLD)
    assert verify(raw).unrecognized == {"x_future": {"k": [1, 2]}}


def test_signing_is_deterministic_and_canonical() -> None:
    raw = sign_desired(state(), OLD)
    assert sign_desired(state(), OLD) == raw
    assert raw == canonical_json(json.loads(raw))
    data = json.loads(raw)
    assert data["signatures"] == [{
        "keyid": hashlib.sha256(OLD.public_key().public_bytes_raw()).hexdigest(),
        "sig": OLD.sign(state().to_bytes()).hex(),
    }]
    assert data["signed"] == state().to_dict()


# ---------------------------------------------------------------------------------------------
# refused
# ---------------------------------------------------------------------------------------------
def _set_signed(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["signed"].__setitem__(key, value)


REFUSED: list[tuple[str, Callable[[], bytes], dict[str, Any], type[Exception], str]] = [
    # name, envelope, verify overrides, exception, message substring
    ("tampered sequence", lambda: edit(sign_desired(state(), OLD), _set_signed("sequence", 11)),
     {}, BadSignature, "do not verify"),
    ("tampered model digest",
     lambda: edit(sign_desired(state(), OLD),
                  lambda d: d["signed"]["models"][0].__setitem__("sha256", "ee" * 32)),
     {}, BadSignature, "do not verify"),
    ("field added after signing",
     lambda: edit(sign_desired(state(), OLD), _set_signed("x_evil", 1)),
     {}, BadSignature, "do not verify"),
    ("signed by an unknown key", lambda: sign_desired(state(), STRANGER), {}, BadSignature,
     "signatures only by unknown keys"),
    ("old key after rotation", lambda: sign_desired(state(), OLD),
     {"public_keys": trust(NEW)}, BadSignature, "unknown keys"),
    ("no signatures", lambda: edit(sign_desired(state(), OLD), lambda d: d.update(signatures=[])),
     {}, BadSignature, "got no signatures"),
    ("trusted keyid, stranger's signature",
     lambda: edit(sign_desired(state(), STRANGER),
                  lambda d: d["signatures"][0].update(keyid=public_key_id(OLD))),
     {}, BadSignature, "do not verify"),
    ("signature not hex",
     lambda: edit(sign_desired(state(), OLD), lambda d: d["signatures"][0].update(sig="zz")),
     {}, BadSignature, "do not verify"),
    ("signature truncated",
     lambda: edit(sign_desired(state(), OLD),
                  lambda d: d["signatures"][0].update(sig=d["signatures"][0]["sig"][:-2])),
     {}, BadSignature, "do not verify"),
    ("another device's state", lambda: sign_desired(state(device_id="dev-2"), OLD), {},
     WrongDevice, "desired state is for device 'dev-2', expected this device 'dev-1'"),
    ("replay of the applied state", lambda: sign_desired(state(sequence=9), OLD), {},
     ReplayedSequence, "desired state sequence 9 is not above the last applied 9"),
    ("older sequence", lambda: sign_desired(state(sequence=7), OLD), {}, ReplayedSequence,
     "desired state sequence 7 is not above the last applied 9"),
    ("expired now", lambda: sign_desired(state(expires_at=NOW), OLD), {}, Expired,
     f"expired at {NOW}, expected a time after now ({NOW}; 0 s ago)"),
    ("expired long ago", lambda: sign_desired(state(issued_at=1, expires_at=2), OLD), {},
     Expired, "expired at 2"),
    ("issued beyond the clock skew", lambda: sign_desired(state(issued_at=NOW + 301), OLD), {},
     NotYetValid, "301 s ahead of the device clock"),
    ("issued ahead with zero skew", lambda: sign_desired(state(issued_at=NOW + 1), OLD),
     {"max_clock_skew": 0}, NotYetValid, "expected at most 0 s"),
    ("oversize envelope", lambda: b"{" + b" " * MAX_MESSAGE_BYTES + b"}", {}, MalformedEnvelope,
     f"at most {MAX_MESSAGE_BYTES} bytes"),
    ("not JSON", lambda: b"\x00garbage", {}, MalformedEnvelope, "strict UTF-8 JSON"),
    ("duplicate signed key", lambda: b'{"signed": {}, "signed": {}, "signatures": []}', {},
     MalformedEnvelope, "duplicate key 'signed'"),
    ("envelope is a list", lambda: b"[]", {}, MalformedEnvelope, "expected an object"),
    ("signed missing", lambda: b'{"signatures": []}', {}, MalformedEnvelope, "'signed'"),
    ("bare state without envelope", lambda: state().to_bytes(), {}, MalformedEnvelope,
     "'signed'"),
    ("signed is a string",
     lambda: edit(sign_desired(state(), OLD), lambda d: d.update(signed="{}")),
     {}, MalformedEnvelope, "'signed'"),
    ("signatures not a list",
     lambda: edit(sign_desired(state(), OLD), lambda d: d.update(signatures={})),
     {}, MalformedEnvelope, "'signatures': expected a list"),
    ("signature not an object",
     lambda: edit(sign_desired(state(), OLD), lambda d: d.update(signatures=["x"])),
     {}, MalformedEnvelope, "'signatures[0]': expected an object"),
    ("keyid not a string",
     lambda: edit(sign_desired(state(), OLD), lambda d: d["signatures"][0].update(keyid=1)),
     {}, MalformedEnvelope, "'signatures[0].keyid'"),
    ("sig missing",
     lambda: edit(sign_desired(state(), OLD), lambda d: d["signatures"][0].pop("sig")),
     {}, MalformedEnvelope, "'signatures[0].sig'"),
    ("validly signed but invalid state",
     lambda: envelope(dict(state().to_dict(), sequence=0), OLD), {}, MalformedEnvelope,
     "'signed.sequence': expected an integer >= 1"),
    ("validly signed, newer schema",
     lambda: envelope(dict(state().to_dict(), schema_version=2), OLD), {}, MalformedEnvelope,
     "'signed.schema_version'"),
]


@pytest.mark.parametrize(("make", "overrides", "error", "message"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_refused(make: Callable[[], bytes], overrides: dict[str, Any], error: type[Exception],
                 message: str) -> None:
    with pytest.raises(error) as info:
        verify(make(), **overrides)
    assert isinstance(info.value, DesiredStateRejected)
    assert message in str(info.value)


def test_replay_of_current_state_is_recognisable() -> None:
    with pytest.raises(ReplayedSequence) as info:
        verify(sign_desired(state(sequence=9), OLD))
    assert info.value.same_as_last
    with pytest.raises(ReplayedSequence) as older:
        verify(sign_desired(state(sequence=8), OLD))
    assert not older.value.same_as_last


def test_signature_checked_before_state_is_parsed() -> None:
    """An unsigned invalid state reports the bad signature, not the parse error."""
    raw = edit(sign_desired(state(), OLD), _set_signed("sequence", "x"))
    with pytest.raises(BadSignature):
        verify(raw)


# ---------------------------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------------------------
MISUSE: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("no trusted keys", {"public_keys": {}}, ValueError, "no trusted public keys"),
    ("keyid not the key's", {"public_keys": {"abc": OLD.public_key()}}, ValueError,
     "listed as 'abc'"),
    ("raw key wrong length", {"public_keys": {"abc": b"short"}}, KeyFormatError, "32 bytes"),
    ("key of wrong type", {"public_keys": {"abc": 42}}, TypeError, "Ed25519 public key"),
    ("invalid device id", {"device_id": "Dev/1"}, ValueError, "invalid device_id"),
    ("negative last sequence", {"last_sequence": -1}, ValueError, "last_sequence"),
    ("negative skew", {"max_clock_skew": -1}, ValueError, "max_clock_skew"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), [r[1:] for r in MISUSE],
                         ids=[r[0] for r in MISUSE])
def test_verify_misuse(overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        verify(sign_desired(state(), OLD), **overrides)
    assert not isinstance(info.value, DesiredStateRejected)


SIGN_ERRORS: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    ("invalid state", lambda: sign_desired(state(sequence=0), OLD), MessageError,
     "'sequence': expected an integer >= 1"),
    ("no keys", lambda: sign_desired(state(), []), ValueError, "at least one private key"),
    ("key of wrong type", lambda: sign_desired(state(), 42), TypeError,  # type: ignore[arg-type]
     "Ed25519 private key"),
    ("PEM garbage", lambda: sign_desired(state(), b"not a pem"), KeyFormatError,
     "expected an Ed25519 private key in PEM"),
    ("state too large to sign",
     lambda: sign_desired(state(models=tuple(
         DesiredModel(name=f"m{i}", version="1", target_path="t" * 2000,
                      manifest_target="m" * 2000, sha256=SHA, length=1, profile="p")
         for i in range(70))), OLD), MessageError, f"at most {MAX_MESSAGE_BYTES} bytes"),
]


@pytest.mark.parametrize(("make", "error", "message"), [r[1:] for r in SIGN_ERRORS],
                         ids=[r[0] for r in SIGN_ERRORS])
def test_sign_refuses(make: Callable[[], bytes], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make()


# ---------------------------------------------------------------------------------------------
# keys and PEM
# ---------------------------------------------------------------------------------------------
def _private_pem(key: Any, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    pem: bytes = key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8, enc)
    return pem


def test_public_key_id_is_sha256_of_raw_key() -> None:
    raw = OLD.public_key().public_bytes_raw()
    expected = hashlib.sha256(raw).hexdigest()
    assert public_key_id(OLD) == public_key_id(OLD.public_key()) == public_key_id(raw) == expected


def test_pem_round_trips() -> None:
    pem = public_key_pem(NEW)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert public_key_id(load_public_key_pem(pem)) == public_key_id(NEW)
    assert public_key_id(load_public_key_pem(pem.decode())) == public_key_id(NEW)
    assert trusted_keys_from_pem([public_key_pem(OLD), pem]).keys() == trust(OLD, NEW).keys()
    private = _private_pem(NEW, b"pw")
    assert public_key_id(load_private_key_pem(private, b"pw")) == public_key_id(NEW)


def test_sign_with_pem_matches_sign_with_key() -> None:
    pem = _private_pem(OLD)
    assert sign_desired(state(), pem) == sign_desired(state(), OLD)
    assert sign_desired(state(), pem.decode()) == sign_desired(state(), OLD)


_EC = ec.derive_private_key(123456789, ec.SECP256R1())
PEM_ERRORS: list[tuple[str, Callable[[], object], str]] = [
    ("private: garbage", lambda: load_private_key_pem(b"garbage"), "unreadable key"),
    ("private: wrong password", lambda: load_private_key_pem(_private_pem(OLD, b"pw"), b"no"),
     "unreadable key"),
    ("private: password missing", lambda: load_private_key_pem(_private_pem(OLD, b"pw")),
     "unreadable key"),
    ("private: not Ed25519", lambda: load_private_key_pem(_private_pem(_EC)),
     "expected Ed25519, got"),
    ("public: garbage", lambda: load_public_key_pem("garbage"), "unreadable key"),
    ("public: not Ed25519", lambda: load_public_key_pem(_EC.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
     "expected Ed25519, got"),
    ("public: private PEM given", lambda: load_public_key_pem(_private_pem(OLD)),
     "unreadable key"),
]


@pytest.mark.parametrize(("load", "message"), [r[1:] for r in PEM_ERRORS],
                         ids=[r[0] for r in PEM_ERRORS])
def test_pem_errors(load: Callable[[], object], message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        load()
