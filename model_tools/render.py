"""Human output for the CLI: progress on stderr, tables and summaries on stdout (rich)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.table import Table

from agent.protocol.manifest import Manifest
from agent.protocol.profiles import DeviceProfile

__all__ = ["Reporter", "candidates_table", "inspect_lines", "profiles_table", "summary_lines"]

# piped output (CI logs, `| less`) gets a readable width instead of rich's 80 columns
_out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
_err = Console(stderr=True, highlight=False)


class Reporter:
    """Shows the current step with a spinner and prints finished steps with their duration."""

    def __init__(self, quiet: bool = False) -> None:
        self._quiet = quiet
        self._status: Any = None
        self._current: str | None = None
        self._started = 0.0

    def __enter__(self) -> Self:
        if not self._quiet:
            self._status = _err.status("starting")
            self._status.__enter__()
        return self

    def step(self, message: str) -> None:
        self._finish()
        self._current, self._started = message, time.monotonic()
        if self._status is not None:
            self._status.update(message + " ...")

    def _finish(self) -> None:
        if self._current is not None and not self._quiet:
            took = time.monotonic() - self._started
            _err.print(f"[green]✓[/] {self._current} [dim]({took:.1f}s)")
        self._current = None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is None:
            self._finish()
        if self._status is not None:
            self._status.__exit__(et, ev, tb)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gate_text(gate: Mapping[str, Any]) -> str:
    if not gate:
        return ""
    return (f"\nlatency gate: p50 <= {gate['limit_ms']:.3f} ms "
            f"({gate['mode']}, x{gate['ratio']:.2f}"
            f"; this host's A/A noise {gate['noise']:.1%})")


def candidates_table(report: Mapping[str, Any]) -> None:
    """The candidates as a table: size, agreement, accuracy delta, p50, verdict."""
    src = report["validation"]["latency_ms"]["source"]
    table = Table(title=f"candidates for profile {report['profile']} "
                        f"(source p50 {src['p50']:.3f} ms, "
                        f"{report['validation']['source_size_bytes']:,} bytes; validated on "
                        f"{report['validation']['samples']} {report['validation']['data_source']}"
                        f" samples){_gate_text(report['validation'].get('latency_gate') or {})}")
    for col in ("precision", "size", "x smaller", "top-1 agree", "acc. delta", "max abs err",
                "p50 ms", "verdict"):
        table.add_column(col, justify="left" if col in ("precision", "verdict") else "right")
    base = report["validation"]["source_size_bytes"]
    for c in report["candidates"]:
        verdict = ("[bold green]chosen[/]" if c["chosen"] else
                   "[green]ok[/]" if c["ok"] else "[red]" + "; ".join(c["reasons"]) + "[/]")
        table.add_row(
            c["precision"],
            f"{c['size_bytes']:,}" if c["size_bytes"] else "-",
            f"{base / c['size_bytes']:.2f}" if c["size_bytes"] else "-",
            _fmt(c["top1_agreement"], ".4f"),
            _fmt(c["accuracy_delta"], "+.4f"),
            _fmt(c["max_abs_error"], ".2e"),
            _fmt(c["p50_ms"], ".3f"),
            verdict,
        )
    _out.print(table)


def summary_lines(manifest: Manifest, bundle: Path) -> Iterator[str]:
    v = manifest.validation
    yield (f"bundle {bundle}: {manifest.name} {manifest.version} for {manifest.profile}, "
           f"{manifest.precision}, {manifest.file.length:,} bytes "
           f"({v.get('size_ratio') or 0:.2f}x smaller than the source)")
    if v.get("top1_agreement") is not None:
        acc = v.get("accuracy_delta")
        yield (f"  top-1 agreement {v['top1_agreement']:.4f}"
               + (f", accuracy {v['source_accuracy']:.4f} -> "
                  f"{v['source_accuracy'] + acc:.4f} ({acc:+.4f})" if acc is not None else ""))
    lat = v["latency_ms"]
    yield (f"  p50 latency {lat['source']['p50']:.3f} ms -> {lat['artifact']['p50']:.3f} ms, "
           f"max abs error {v['max_abs_error']:.2e}")


def profiles_table(profiles: Mapping[str, DeviceProfile]) -> None:
    table = Table(title="device profiles")
    for col in ("name", "arch", "memory", "runtime", "precision", "candidates", "max size",
                "budget p95", "threads", "providers"):
        table.add_column(col)
    for p in profiles.values():
        table.add_row(p.name, p.arch, f"{p.memory_mb} MB", p.runtime, p.precision,
                      ",".join(p.allowed_precisions), f"{p.max_artifact_bytes >> 20} MiB",
                      f"{p.latency_budget_ms:g} ms", str(p.threads),
                      ",".join(x.replace("ExecutionProvider", "") for x in p.execution_providers))
    _out.print(table)


def inspect_lines(checked: Any) -> Iterator[str]:
    m: Manifest = checked.manifest
    v = m.validation
    yield f"bundle     {checked.source}"
    yield f"model      {m.name} {m.version} ({m.task})"
    needs = f" (needs >= {m.min_runtime_version})" if m.min_runtime_version else ""
    yield f"profile    {m.profile}  runtime {m.runtime}{needs}  precision {m.precision}"
    yield (f"file       {m.file.path}  {m.file.length:,} bytes  sha256 {m.file.sha256}  "
           "[verified]")
    for s in m.inputs:
        yield f"input      {s.name} {s.dtype}{s.shape_str()}"
    for s in m.outputs:
        yield f"output     {s.name} {s.dtype}{s.shape_str()}"
    yield (f"validated  on {v.get('samples')} {v.get('data_source')} samples: "
           f"top-1 agreement {_fmt(v.get('top1_agreement'), '.4f')}, "
           f"accuracy delta {_fmt(v.get('accuracy_delta'), '+.4f')}, "
           f"max abs error {_fmt(v.get('max_abs_error'), '.2e')}")
    lat = v.get("latency_ms", {})
    if lat.get("artifact"):
        yield (f"latency    p50 {lat['source']['p50']:.3f} -> {lat['artifact']['p50']:.3f} ms, "
               f"p95 {lat['source']['p95']:.3f} -> {lat['artifact']['p95']:.3f} ms (build host)")
    yield (f"golden     {next(iter(m.golden.inputs.values())).shape[0]} samples, "
           f"atol {m.golden.atol:g}")
    kinds = {k: e.get("kind") for k, e in m.drift_baseline.get("inputs", {}).items()}
    yield (f"baseline   from {m.drift_baseline.get('samples')} "
           f"{m.drift_baseline.get('source')} samples, inputs {kinds}")
    lin = m.lineage
    yield (f"lineage    source sha256 {lin.get('source_sha256')}, calibration "
           f"{lin.get('calibration_sha256') or '-'}, built {lin.get('created_at')} with "
           + ", ".join(f"{k} {v}" for k, v in lin.get("tools", {}).items()))
