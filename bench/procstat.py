"""CPU accounting from /proc for the benchmarks that split a run's CPU by thread and process
(``ingest.py``, ``outbox_drain.py``). Linux only; imported by name with ``bench/`` on
``sys.path``, as the scripts run."""

from __future__ import annotations

import os
import resource
import sys
import threading

__all__ = ["log", "machine_cpu", "process_cpu", "stat_cpu", "thread_cpu"]

_TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stat_cpu(path: str) -> float | None:
    """utime + stime in seconds from a /proc .../stat file (None: gone)."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_cpu() -> float:
    """CPU seconds of this process so far (every thread)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def thread_cpu() -> dict[str, float]:
    """CPU seconds of every live thread of this process, by thread name."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.native_id is None:
            continue
        cpu = stat_cpu(f"/proc/self/task/{t.native_id}/stat")
        if cpu is not None:
            out[t.name] = out.get(t.name, 0.0) + cpu
    return out


def machine_cpu() -> float:
    """CPU seconds all CPUs of the machine spent busy so far (/proc/stat: not idle, iowait)."""
    with open("/proc/stat", encoding="ascii") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK
