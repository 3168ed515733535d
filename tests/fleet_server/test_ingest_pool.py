"""Parse processes for ingest: same answers as in-thread, in order, nothing lost when one dies.

Real spawned processes, killed for real (SIGKILL; SIGSTOP to hold one mid-chunk), and a real
SQLite file behind the runtime. Waiting for a process to start or to be seen dead polls the
condition (``tests/polling.wait_for``), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from polling import wait_for
from sqlalchemy import select

from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    Ack,
    Record,
    Reported,
    Status,
    TelemetryBatch,
)
from agent.protocol.topics import device_topic
from fleet_server import auth
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.ingest_parse import (
    Checked,
    ParsePool,
    RecordBatch,
    Refused,
    check_messages,
)
from fleet_server.registry import devices
from fleet_server.runtime import INGEST_GROUP, MqttRuntime
from fleet_server.settings import Settings

NOW = 1_800_000_000
DEVICES = ["dev-a", "dev-b", "dev-c"]


def telemetry(device: str, seqs: list[int]) -> tuple[str, bytes]:
    return device_topic(device, "telemetry"), TelemetryBatch(device_id=device, records=tuple(
        Record(seq=s, kind="metrics", at=NOW, body={"n": s, "name": "é"}) for s in seqs)
    ).to_bytes()


def mixed_group(start: int) -> list[tuple[str, bytes]]:
    """Telemetry of three devices, interleaved, with hostile and state messages among them."""
    group = [telemetry(DEVICES[i % 3], [start + i // 3]) for i in range(30)]
    group[5] = (device_topic("dev-a", "telemetry"), b'{"dup":1,"dup":2}')
    group[9] = (device_topic("dev-b", "ack"), Ack(device_id="dev-b", stream="telemetry",
                                                  upto_seq=1).to_bytes())
    group[14] = (device_topic("dev-c", "status"),
                 Status(device_id="dev-c", online=True, at=NOW).to_bytes())
    group[20] = (device_topic("dev-a", "reported"), Reported(
        device_id="dev-a", applied_sequence=0, running=(), state="Idle", last_result=None,
        last_error=None, agent_version="0.1", reported_at=NOW).to_bytes())
    return group


def swelling_reported(device: str) -> tuple[str, bytes]:
    """A valid ``reported`` under the size limit whose canonical re-encoding is over it:
    ``1E5`` is stored as ``100000.0``."""
    head = Reported(device_id=device, applied_sequence=0, running=(), state="Idle",
                    last_result=None, last_error=None, agent_version="0.1",
                    reported_at=NOW).to_bytes()[:-1]
    n = (MAX_MESSAGE_BYTES - len(head) - 20) // 4
    payload = head + b',"x":[' + b",".join([b"1E5"] * n) + b"]}"
    assert len(payload) <= MAX_MESSAGE_BYTES
    return device_topic(device, "reported"), payload


@pytest.fixture
def pool() -> Iterator[ParsePool]:
    p = ParsePool(2, reply_timeout=30)
    try:
        wait_for("2 parse processes ready", lambda: p.ready() == 2)
        yield p
    finally:
        p.close()


def test_the_pool_answers_as_the_ingest_thread_does_in_arrival_order(pool: ParsePool) -> None:
    groups = [mixed_group(10 * k + 1) for k in range(4)]
    submitted = [pool.submit(g, NOW + k) for k, g in enumerate(groups)]
    assert all(s is not None and len(s.chunks) == 2 for s in submitted)
    for k, (group, sub) in enumerate(zip(groups, submitted, strict=True)):
        assert sub is not None
        assert pool.collect(sub) == check_messages(group, NOW + k)
    assert (pool.restarts, pool.reparsed) == (0, 0)


def test_groups_far_larger_than_a_pipe_buffer_are_pipelined_without_deadlock(
        pool: ParsePool) -> None:
    body = {"histogram": [1.25] * 300}
    big = [(device_topic(DEVICES[i % 3], "telemetry"), TelemetryBatch(
        device_id=DEVICES[i % 3], records=tuple(
            Record(seq=s, kind="metrics", at=NOW, body=body) for s in range(1, 101))
    ).to_bytes()) for i in range(24)]  # about 200 KB each, 5 MB a group
    answers: list[list[Checked]] = []

    def run() -> None:
        submitted = [pool.submit(big, NOW) for _ in range(3)]  # three groups, none collected
        answers.extend(pool.collect(sub) for sub in submitted if sub is not None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "submit/collect deadlocked on full pipes"
    assert answers == [check_messages(big, NOW)] * 3


def test_an_idle_pool_starts_its_processes_on_first_use_and_declines_until_ready() -> None:
    p = ParsePool(1)
    try:
        assert p.pids == []  # nothing started by construction
        first = p.submit(mixed_group(1), NOW)  # starts the process; not ready this instant
        assert first is None and len(p.pids) == 1
        wait_for("the parse process ready", lambda: p.ready() == 1)
        again = p.submit(mixed_group(1), NOW)
        assert again is not None and p.collect(again) == check_messages(mixed_group(1), NOW)
    finally:
        p.close()


def test_a_killed_worker_is_replaced_and_its_chunks_reparsed_here(
        pool: ParsePool, caplog: pytest.LogCaptureFixture) -> None:
    victim = pool.pids[0]
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)  # holds its chunks unanswered until the kill below
    groups = [mixed_group(1), mixed_group(11)]
    submitted = [pool.submit(g, NOW) for g in groups]
    os.kill(victim, signal.SIGKILL)
    for group, sub in zip(groups, submitted, strict=True):
        assert sub is not None
        assert pool.collect(sub) == check_messages(group, NOW)
    assert pool.restarts == 1
    assert pool.reparsed == 2 * 15  # the victim's half of each group
    assert "died (exit code -9) with 2 chunk(s) unanswered: re-parsing them" in caplog.text
    assert victim not in pool.pids
    wait_for("the replacement ready", lambda: pool.ready() == 2)
    later = pool.submit(mixed_group(21), NOW)
    assert later is not None and pool.collect(later) == check_messages(mixed_group(21), NOW)
    assert pool.restarts == 1


def test_a_hung_worker_is_killed_after_the_reply_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    p = ParsePool(1, reply_timeout=0.3)
    try:
        wait_for("the parse process ready", lambda: p.ready() == 1)
        hung = p.pids[0]
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        sub = p.submit(mixed_group(1), NOW)
        assert sub is not None
        assert p.collect(sub) == check_messages(mixed_group(1), NOW)
        assert (p.restarts, p.reparsed) == (1, 30)
        assert "did not answer within 0.3 s" in caplog.text
        assert wait_for("the hung process gone", lambda: not _alive(hung))
    finally:
        p.close()


def test_close_asks_then_kills_and_leaves_no_process(pool: ParsePool) -> None:
    pids = [pid for pid in pool.pids if pid is not None]
    os.kill(pids[1], signal.SIGSTOP)  # cannot read the request to exit: killed after timeout
    pool.close(timeout=0.5)
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(mixed_group(1), NOW)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------ the runtime
class CheckingPublisher:
    """Records acks, checking on its own connection that each covers only committed rows."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.acks: list[tuple[str, int]] = []

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        raise AssertionError("no desired states here")

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        ack = Ack.from_bytes(payload)
        with self.fleet.engine.connect() as conn:
            have = conn.execute(select(tables.device_records.c.seq).where(
                tables.device_records.c.device_id == device_id,
                tables.device_records.c.seq <= ack.upto_seq)).all()
        assert len(have) == ack.upto_seq, f"ack {ack.upto_seq} for {device_id} uncommitted"
        self.acks.append((device_id, ack.upto_seq))


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[MqttRuntime]:
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    fleet.publisher = CheckingPublisher(fleet)
    with atomic(fleet.engine) as conn:
        admin = auth.Principal("t", "test", "admin")
        for dev in DEVICES:
            devices.provision(fleet, conn, device_id=dev, profile="rpi4", tags=[], actor=admin)
    rt = MqttRuntime(fleet, parse_workers=1, clock=lambda: NOW)
    assert rt.parse_pool is not None
    try:
        wait_for("the parse process ready", lambda: rt.parse_pool.ready() == 1)  # type: ignore[union-attr]
        yield rt
    finally:
        rt._ingest_pool.shutdown(wait=True)
        rt.parse_pool.close()
        rt._ack_pool.shutdown(wait=True)
        rt._replan_pool.shutdown(wait=True)
        fleet.engine.dispose()


def _feed_while_busy(rt: MqttRuntime, messages: list[tuple[str, bytes]],
                     before_release: object = None) -> list[list[tuple[str, int]]]:
    """Queue ``messages`` while the ingest worker is busy, release it, wait for the drain;
    return what each stored group held, as (device, first seq) of its telemetry."""
    stored: list[list[tuple[str, int]]] = []
    store = rt._store_group

    def recorded(checked: list[Checked], now: int) -> None:
        stored.append([(c.device_id, c.rows[0][2]) for c in checked
                       if isinstance(c, RecordBatch)])
        store(checked, now)

    rt._store_group = recorded  # type: ignore[method-assign]
    busy = threading.Event()
    rt._ingest_pool.submit(busy.wait, 30)
    for topic, payload in messages:
        rt._on_message(SimpleNamespace(topic=topic, payload=payload))
    if callable(before_release):
        before_release()
    busy.set()
    rt._ingest_pool.submit(lambda: None).result(60)  # the drain ran before this
    rt.wait_acks(30)
    return stored


def _held(rt: MqttRuntime) -> dict[str, list[int]]:
    with atomic(rt.fleet.engine) as conn:
        rows = conn.execute(select(tables.device_records.c.device_id,
                                   tables.device_records.c.seq)).all()
    out: dict[str, list[int]] = {}
    for device, seq in sorted(rows):
        out.setdefault(device, []).append(seq)
    return out


def test_the_runtime_parses_a_backlog_in_the_pool_and_stores_in_arrival_order(
        runtime: MqttRuntime) -> None:
    per_device = 50
    messages = [telemetry(DEVICES[i % 3], [i // 3 + 1]) for i in range(3 * per_device)]
    collected: list[int] = []
    pool = runtime.parse_pool
    assert pool is not None
    collect = pool.collect

    def counted(sub: object) -> list[Checked]:
        out = collect(sub)  # type: ignore[arg-type]
        collected.append(len(out))
        return out

    pool.collect = counted  # type: ignore[method-assign]
    stored = _feed_while_busy(runtime, messages)
    assert [len(g) for g in stored] == [INGEST_GROUP, INGEST_GROUP, 22]
    assert collected == [INGEST_GROUP, INGEST_GROUP, 22]  # every group went through the pool
    assert [m for g in stored for m in g] == [(DEVICES[i % 3], i // 3 + 1)
                                               for i in range(3 * per_device)]
    assert _held(runtime) == {d: list(range(1, per_device + 1)) for d in DEVICES}
    publisher = runtime.fleet.publisher
    assert isinstance(publisher, CheckingPublisher)
    assert {d: upto for d, upto in publisher.acks} == {d: per_device for d in DEVICES}
    # idle again: a lone message is parsed on the ingest thread, stored at once
    topic, payload = telemetry("dev-a", [per_device + 1])
    runtime._on_message(SimpleNamespace(topic=topic, payload=payload))
    runtime._ingest_pool.submit(lambda: None).result(30)
    assert collected == [INGEST_GROUP, INGEST_GROUP, 22]
    assert _held(runtime)["dev-a"][-1] == per_device + 1


def test_a_parse_process_killed_mid_backlog_loses_nothing(
        runtime: MqttRuntime, caplog: pytest.LogCaptureFixture) -> None:
    pool = runtime.parse_pool
    assert pool is not None
    victim = pool.pids[0]
    assert victim is not None
    messages = [telemetry(DEVICES[i % 3], [i // 3 + 1]) for i in range(3 * 60)]
    os.kill(victim, signal.SIGSTOP)  # it takes chunks but answers none

    def kill_once_two_groups_wait() -> None:
        threading.Thread(target=lambda: (
            wait_for("two groups at the stopped parse process", lambda: pool.unanswered == 2),
            os.kill(victim, signal.SIGKILL)), daemon=True).start()

    stored = _feed_while_busy(runtime, messages, kill_once_two_groups_wait)
    assert [m for g in stored for m in g] == [(DEVICES[i % 3], i // 3 + 1) for i in range(180)]
    assert _held(runtime) == {d: list(range(1, 61)) for d in DEVICES}
    assert pool.restarts == 1 and pool.reparsed == 2 * INGEST_GROUP
    assert "died (exit code -9)" in caplog.text  # killed, not timed out (30 s)
    assert victim not in pool.pids
    snap = runtime.counters.snapshot()  # what /metrics reports
    assert snap["stored"] == {"telemetry": 180}
    assert (snap["parse_restarts"], snap["parse_reparsed"]) == (1, 2 * INGEST_GROUP)


def test_stop_stores_the_backlog_then_ends_the_parse_processes(
        runtime: MqttRuntime) -> None:
    pool = runtime.parse_pool
    assert pool is not None
    pids = [pid for pid in pool.pids if pid is not None]
    busy = threading.Event()
    runtime._ingest_pool.submit(busy.wait, 30)
    for i in range(150):
        topic, payload = telemetry(DEVICES[i % 3], [i // 3 + 1])
        runtime._on_message(SimpleNamespace(topic=topic, payload=payload))
    busy.set()
    asyncio.run(runtime.stop())  # waits for the drain, then closes the pool
    assert _held(runtime) == {d: list(range(1, 51)) for d in DEVICES}
    assert pids and not any(_alive(pid) for pid in pids)


def test_parse_workers_zero_parses_on_the_ingest_thread(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    try:
        assert MqttRuntime(fleet, parse_workers=0).parse_pool is None
        with pytest.raises(ValueError, match="parse_workers >= 0, got -1"):
            MqttRuntime(fleet, parse_workers=-1)
    finally:
        fleet.engine.dispose()


def test_a_reported_that_swells_past_the_limit_is_refused_not_raised(pool: ParsePool) -> None:
    """In the pool as in the thread: refused alone, no process lost, the rest answered."""
    group = [telemetry("dev-a", [1]), swelling_reported("dev-a"), telemetry("dev-b", [1])]
    here = check_messages(group, NOW)
    assert isinstance(here[1], Refused) and here[1].kind == "malformed"
    assert "expected at most 262144 bytes" in here[1].reason
    sub = pool.submit(group, NOW)
    later = pool.submit([telemetry("dev-c", [1]), telemetry("dev-c", [2])], NOW)
    assert sub is not None and later is not None
    assert pool.collect(sub) == here
    assert [c.rows[0][2] for c in pool.collect(later)
            if isinstance(c, RecordBatch)] == [1, 2]
    assert (pool.restarts, pool.reparsed) == (0, 0)


def test_a_check_that_raises_refuses_that_message_alone(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """check_messages is total: a bug in one check neither stalls ingest nor drops the rest."""
    from fleet_server import ingest_parse

    real = ingest_parse.check_message

    def buggy(topic: str, payload: bytes, now: int) -> Checked:
        if topic.endswith("/status"):
            raise KeyError("boom")
        return real(topic, payload, now)

    monkeypatch.setattr(ingest_parse, "check_message", buggy)
    status = (device_topic("dev-a", "status"),
              Status(device_id="dev-a", online=True, at=NOW).to_bytes())
    got = check_messages([telemetry("dev-a", [1]), status, telemetry("dev-b", [1])], NOW)
    assert [type(c).__name__ for c in got] == ["RecordBatch", "Refused", "RecordBatch"]
    refused = got[1]
    assert isinstance(refused, Refused)
    assert refused.reason == "internal error while checking it: KeyError: 'boom'"
    assert "checking a device message" in caplog.text


def test_after_a_swelling_reported_ingest_goes_on(tmp_path: Path) -> None:
    """A lone message is parsed on the ingest thread: one that cannot be stored must not
    leave the drain flagged as running, or nothing after it is ever stored."""
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    fleet.publisher = CheckingPublisher(fleet)
    with atomic(fleet.engine) as conn:
        devices.provision(fleet, conn, device_id="dev-a", profile="rpi4", tags=[],
                          actor=auth.Principal("t", "test", "admin"))
    rt = MqttRuntime(fleet, parse_workers=0, clock=lambda: NOW)
    try:
        for topic, payload in (swelling_reported("dev-a"), telemetry("dev-a", [1, 2])):
            rt._on_message(SimpleNamespace(topic=topic, payload=payload))
            rt._ingest_pool.submit(lambda: None).result(30)  # the drain has run
        assert not rt._draining
        assert _held(rt) == {"dev-a": [1, 2]}
        snap = rt.counters.snapshot()
        assert snap["rejected"] == {"malformed": 1}
        assert snap["stored"] == {"telemetry": 2}
    finally:
        rt._ingest_pool.shutdown(wait=True)
        rt._ack_pool.shutdown(wait=True)
        rt._replan_pool.shutdown(wait=True)
        fleet.engine.dispose()
