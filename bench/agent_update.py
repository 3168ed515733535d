"""Benchmark what ONE agent's update costs: agent CPU per update, one update at a time.

Usage::

    .venv/bin/python bench/agent_update.py                       # 30 updates, Mosquitto
    .venv/bin/python bench/agent_update.py --updates 50 --json
    .venv/bin/python bench/agent_update.py --compare /tmp/old-tree --rounds 3
    .venv/bin/python bench/agent_update.py --py-spy /path/to/py-spy --profile out.txt

One :class:`fleet_server.simulate.FleetSimulation` with one device (``rpi4``) in one worker
process, against the real server and broker. Each update pushes a new version of the digits
bundle (``1.1.<i>``: the same model, its manifest's version changed), deploys it and waits
until the device reports it running with result ``ok``. The worker's CPU time over the update
(the sum of its threads' ``/proc/<pid>/task/*/schedstat``, in ns) is the agent's cost: MQTT,
the desired state, the TUF refresh and both downloads, verification, staging, the health
check, the state writes and the reported state. A real device pays that too, without a
fleet's contention. The first ``--warmup`` updates are not counted (imports, first-use
caches). The server's repository grows by two targets per update, as a real one does.

``--compare DIR`` interleaves this tree with another copy of the project (e.g. this tree with
some files at their committed version): ``--rounds`` times, one run of each, each a fresh
simulation in its own process whose ``sys.path`` starts with that tree; it reports each run's
mean and the ratio of the medians.

``--py-spy PATH --profile FILE`` samples the worker with py-spy (``record --format raw``, the
collapsed stacks) during the counted updates.

Results go to stdout (Markdown or ``--json``), progress to stderr. Exit codes: 0 done, 1 error,
2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(os.environ.get("EDGEFLEET_TREE", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(REPO))

from fleet_server.simulate import (  # noqa: E402 - after the sys.path line above
    MODEL,
    FleetSimulation,
    SimConfig,
    bundle_tar,
)


def _cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` (ns, ``/proc/<pid>/task/*/schedstat``): finer
    than ``/proc/<pid>/stat``'s 10 ms ticks. A thread that exits between two readings takes its
    time with it; the agent's threads (loop, executor, paho) live as long as the agent.

    Raises:
        RuntimeError: the process is gone.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError as exc:
        raise RuntimeError(f"the worker process {pid} is gone") from exc
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


def _wait_running(sim: FleetSimulation, device: str, version: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rep = sim.reported(only=[device]).get(device) or {}
        running = {m.get("name"): m.get("version") for m in rep.get("running") or ()}
        if running.get(MODEL) == version and rep.get("last_result") == "ok":
            return
        if rep.get("last_result") not in (None, "ok") and running.get(MODEL) != version:
            raise RuntimeError(f"update to {version} failed on the device: {rep}")
        time.sleep(0.02)
    raise TimeoutError(f"device {device} did not report {MODEL} {version} within {timeout_s} s")


def measure(updates: int, warmup: int, broker: str, work_dir: Path,
            py_spy: str | None = None, profile: Path | None = None) -> dict[str, Any]:
    """Run ``warmup + updates`` sequential updates of one device; agent CPU ms per update.

    Raises:
        RuntimeError, TimeoutError: the simulation failed or an update did not converge.
    """
    cfg = SimConfig(devices=1, workers=1, broker=broker, profiles=("rpi4",),
                    work_dir=work_dir, cache_dir=work_dir / "bundles", timeout_s=60.0)
    cpu_ms: list[float] = []
    wall_ms: list[float] = []
    spy: subprocess.Popen[bytes] | None = None
    with FleetSimulation(cfg) as sim:
        bundle_dir = sim.cache_dir / f"{MODEL}-1.0.0-rpi4"
        pid = sim._shards[0].pid
        device = sim.devices[0].device_id
        if pid is None:
            raise RuntimeError("the agent is not in a worker process")
        for i in range(warmup + updates):
            if i == warmup and py_spy and profile:
                spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw",
                                        "--rate", "500", "--gil", "--nonblocking",
                                        "--output", str(profile)], stdout=subprocess.DEVNULL)
                time.sleep(1.0)
            version = f"1.1.{i}"
            sim._post("/v1/models", content=bundle_tar(bundle_dir, version=version),
                      headers={"Content-Type": "application/x-tar"})
            time.sleep(0.2)  # let the agent go idle (the push publishes nothing to it)
            cpu0, t0 = _cpu_ns(pid), time.perf_counter()
            sim._post("/v1/deployments", json={"model": MODEL, "version": version,
                                               "selector": {"tags": ["sim"]}})
            _wait_running(sim, device, version, cfg.timeout_s)
            time.sleep(0.2)  # the agent's work after its report (a report is published last)
            cpu1, t1 = _cpu_ns(pid), time.perf_counter()
            if i >= warmup:
                cpu_ms.append((cpu1 - cpu0) / 1e6)
                wall_ms.append(1e3 * (t1 - t0 - 0.2))
            print(f"update {i}: {(cpu1 - cpu0) / 1e6:.1f} ms CPU", file=sys.stderr)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(30)
        # the idle cost over the same window: what the agent spends doing nothing
        idle0 = _cpu_ns(pid)
        time.sleep(1.0)
        idle = _cpu_ns(pid) - idle0
    return {"tree": str(REPO), "updates": updates, "broker": broker,
            "cpu_ms_median": statistics.median(cpu_ms), "cpu_ms_mean": statistics.fmean(cpu_ms),
            "cpu_ms": cpu_ms, "wall_ms_median": statistics.median(wall_ms),
            "idle_cpu_ms_per_s": idle / 1e6}


def _run_tree(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--updates", str(args.updates),
           "--warmup", str(args.warmup), "--broker", args.broker, "--work-dir",
           str(args.work_dir), "--json"]
    env = {**os.environ, "EDGEFLEET_TREE": str(tree), "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.PIPE).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=30, help="counted updates (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted first updates")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "agent_update",
                        help="bundles cache and run files (default bench/out/agent_update)")
    parser.add_argument("--compare", type=Path, help="another tree to interleave with this one")
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: runs of each")
    parser.add_argument("--py-spy", help="py-spy executable, to sample the worker")
    parser.add_argument("--profile", type=Path, help="with --py-spy: collapsed stacks file")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    if args.updates < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(f"--updates >= 1, --warmup >= 0, --rounds >= 1; got {args.updates}, "
                     f"{args.warmup}, {args.rounds}")
    if args.compare is not None and not (args.compare / "fleet_server").is_dir():
        parser.error(f"--compare: expected a project tree, {args.compare} has no fleet_server/")
    load = os.getloadavg()[0]
    try:
        if args.compare is None:
            result = measure(args.updates, args.warmup, args.broker, args.work_dir,
                             args.py_spy, args.profile)
            result["load_1m_before"], result["load_1m_after"] = load, os.getloadavg()[0]
            if args.json:
                print(json.dumps(result))
            else:
                print(f"| tree | updates | agent CPU ms/update (median / mean) | wall ms | "
                      f"load before / after |\n|---|--:|--:|--:|--:|\n| {result['tree']} | "
                      f"{args.updates} | {result['cpu_ms_median']:.1f} / "
                      f"{result['cpu_ms_mean']:.1f} | {result['wall_ms_median']:.0f} | "
                      f"{load:.1f} / {result['load_1m_after']:.1f} |")
            return 0
        this: list[float] = []
        other: list[float] = []
        for r in range(args.rounds):
            for tree, into in ((args.compare, other), (REPO, this)):
                res = _run_tree(tree.resolve(), args)
                into.append(res["cpu_ms_mean"])
                print(f"round {r}: {tree}: {res['cpu_ms_mean']:.1f} ms/update "
                      f"(median {res['cpu_ms_median']:.1f})", file=sys.stderr)
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as exc:
        print(f"agent_update: {exc}", file=sys.stderr)
        return 1
    a, b = statistics.median(this), statistics.median(other)
    summary = {"this": this, "other": other, "this_median": a, "other_median": b,
               "ratio": a / b, "load_1m_before": load, "load_1m_after": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"| tree | agent CPU ms/update (mean per run) | median |\n|---|---|--:|\n"
              f"| {args.compare} | {', '.join(f'{v:.1f}' for v in other)} | {b:.1f} |\n"
              f"| {REPO} | {', '.join(f'{v:.1f}' for v in this)} | {a:.1f} |\n\n"
              f"ratio this / other: {a / b:.2f}; load {load:.1f} -> "
              f"{summary['load_1m_after']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
