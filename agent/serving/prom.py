"""The agent's Prometheus metrics, for ``GET /metrics`` on the local API (prometheus-client).

Each :class:`AgentMetrics` has its own :class:`~prometheus_client.CollectorRegistry`, never the
library's global one: several agents in one process (tests, ``fleet_server.simulate``) would
otherwise collide on metric names, and a scrape would mix their numbers.

Nothing here runs per request. The request counters and the latency histogram are the running
totals of the :class:`~agent.metrics.RequestMetrics` the daemon already feeds per request (one
lock, one bucket search), read at scrape time; prometheus-client's own ``Counter`` and
``Histogram`` would add three more locks and a linear bucket search to every request. The
rest is read at scrape time too, through the ``state`` callback, which the daemon implements by
reading the outbox (a few indexed SQLite scans), the MQTT link and the host. The server renders
in a worker thread, so a scrape never blocks the event loop on SQLite.

Families (the exposition adds ``_total``, ``_bucket``/``_sum``/``_count`` and ``_info``)::

    edgefleet_agent_requests_total{model,version,outcome}      counter: every request that
        reached a model; outcome ok | bad_request | runtime_error | internal (the HTTP error
        kinds of agent.serving.server); an unknown model's 404 is not counted here
    edgefleet_agent_request_duration_seconds{model}            histogram: successful requests
        (all versions), from the host's submit to the answer encoded; agent.metrics' buckets
    edgefleet_agent_model_info{model,version}                  info: what is served now
    edgefleet_agent_model_inline{model}                        gauge: 1 when the model runs
        inline on the event loop, 0 in the thread pool (agent.serving.host)
    edgefleet_agent_outbox_rows{stream}                        gauge: rows waiting for an ack
    edgefleet_agent_outbox_max_rows                            gauge: the cap
    edgefleet_agent_outbox_evicted_rows_total{priority}        counter: rows evicted because
        the outbox was full (kept in the outbox file, so it survives restarts)
    edgefleet_agent_last_ack_timestamp_seconds{stream}         gauge: unix time of the last
        ack from the server (absent until the first one of this run)
    edgefleet_agent_seconds_since_last_ack{stream}             gauge: now minus that
    edgefleet_agent_broker_connected                           gauge: 1 when the MQTT link is up
    edgefleet_agent_info{agent_version,device_id,profile}      info: which agent this is

When the outbox cannot be read at scrape time (it failed, or the daemon is closing it), the
outbox families are left out of that scrape and the daemon logs a warning; the rest is served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from agent.metrics import RequestMetrics, RequestTotals

if TYPE_CHECKING:  # the outbox module pulls in sqlite-utils; serving alone does not need it
    from agent.buffer.store import OutboxStats

__all__ = ["NAMESPACE", "OUTCOMES", "AgentMetrics", "AgentState", "ServedModel"]

NAMESPACE: Final = "edgefleet_agent"
#: the ``outcome`` label of each count of agent.metrics ("ok", then its ERROR_KINDS)
OUTCOMES: Final[Mapping[str, str]] = {"ok": "ok", "4xx": "bad_request",
                                      "runtime": "runtime_error", "5xx": "internal"}


@dataclass(frozen=True)
class ServedModel:
    """One model the host serves now."""

    name: str
    version: str
    inline: bool  # runs on the event loop's thread (agent.serving.host placement)


@dataclass(frozen=True)
class AgentState:
    """What the agent is at scrape time; the daemon builds one per scrape."""

    now: float  # unix seconds, for the seconds since the last ack
    models: Sequence[ServedModel]
    connected: bool  # MQTT link up
    last_ack: Mapping[str, float] = field(default_factory=dict)  # stream -> unix seconds
    outbox: OutboxStats | None = None  # None: could not be read (left out of the scrape)


class _Collector:
    """Every family, from one ``state()`` and one ``totals()`` call per scrape."""

    def __init__(self, state: Callable[[], AgentState], requests: RequestMetrics,
                 info: Mapping[str, str]) -> None:
        self._state = state
        self._requests = requests
        self._info = dict(info)
        self._le = [repr(ms / 1e3) for ms in requests.edges_ms] + ["+Inf"]  # "0.0005", "1.0"

    def describe(self) -> list[Metric]:
        # the families without samples: lets the registry check names without a scrape
        return list(self._families(None, ()))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._state(), self._requests.totals())

    def _families(self, state: AgentState | None, totals: Sequence[RequestTotals]
                  ) -> Iterator[Metric]:
        ns = NAMESPACE
        yield from self._request_families(totals)
        info = InfoMetricFamily(ns, "Which agent this is.", labels=sorted(self._info))
        model_info = InfoMetricFamily(f"{ns}_model", "The models served now.",
                                      labels=["model", "version"])
        inline = GaugeMetricFamily(f"{ns}_model_inline", "1 when the model runs inline on "
                                   "the event loop, 0 in the inference thread pool.",
                                   labels=["model"])
        connected = GaugeMetricFamily(f"{ns}_broker_connected",
                                      "1 when the MQTT link to the fleet is up.")
        acked_at = GaugeMetricFamily(f"{ns}_last_ack_timestamp_seconds", "Unix time of the "
                                     "last ack from the server, per stream (this run).",
                                     labels=["stream"])
        since = GaugeMetricFamily(f"{ns}_seconds_since_last_ack", "Seconds since the last "
                                  "ack from the server, per stream (this run).",
                                  labels=["stream"])
        rows = GaugeMetricFamily(f"{ns}_outbox_rows", "Outbox rows waiting for the server's "
                                 "ack, per stream.", labels=["stream"])
        max_rows = GaugeMetricFamily(f"{ns}_outbox_max_rows", "The outbox's row cap.")
        evicted = CounterMetricFamily(f"{ns}_outbox_evicted_rows", "Outbox rows evicted "
                                      "because it was full, per priority.",
                                      labels=["priority"])
        stats = None
        if state is not None:
            info.add_metric([self._info[k] for k in sorted(self._info)], {})
            for model in state.models:
                model_info.add_metric([model.name, model.version], {})
                inline.add_metric([model.name], 1.0 if model.inline else 0.0)
            connected.add_metric([], 1.0 if state.connected else 0.0)
            for stream, at in sorted(state.last_ack.items()):
                acked_at.add_metric([stream], at)
                since.add_metric([stream], max(0.0, state.now - at))
            stats = state.outbox
            if stats is not None:
                for stream, stream_stats in sorted(stats.streams.items()):
                    rows.add_metric([stream], float(stream_stats.rows))
                max_rows.add_metric([], float(stats.max_rows))
                for priority, total in sorted(stats.evicted_total.items()):
                    evicted.add_metric([priority], float(total))
        yield from (info, model_info, inline, connected, acked_at, since)
        if state is None or stats is not None:
            yield from (rows, max_rows, evicted)

    def _request_families(self, totals: Sequence[RequestTotals]) -> Iterator[Metric]:
        ns = NAMESPACE
        requests = CounterMetricFamily(f"{ns}_requests", "Requests that reached a model, by "
                                       "outcome.", labels=["model", "version", "outcome"])
        latency = HistogramMetricFamily(f"{ns}_request_duration_seconds", "Latency of "
                                        "successful requests, from submit to the answer "
                                        "encoded.", labels=["model"])
        per_model: dict[str, tuple[list[int], float]] = {}
        for t in totals:
            counts = {"ok": t.ok, **t.errors}
            for kind, outcome in OUTCOMES.items():
                requests.add_metric([t.model, t.version, outcome], float(counts[kind]))
            buckets, total = per_model.get(t.model, ([0] * len(t.latency_counts), 0.0))
            per_model[t.model] = ([a + b for a, b in zip(buckets, t.latency_counts,
                                                         strict=True)],
                                  total + t.latency_sum_ms)
        for model, (buckets, total_ms) in per_model.items():
            cumulative, running = [], 0
            for le, n in zip(self._le, buckets, strict=True):
                running += n
                cumulative.append((le, float(running)))
            latency.add_metric([model], cumulative, sum_value=total_ms / 1e3)
        yield from (requests, latency)


class AgentMetrics:
    """One agent's registry (see the module docstring); render it with :meth:`render`."""

    def __init__(self, state: Callable[[], AgentState], requests: RequestMetrics, *,
                 info: Mapping[str, str]) -> None:
        """Build the registry; nothing is read until the first scrape.

        Args:
            state: called once per scrape, in the rendering thread (it may block on SQLite).
            requests: the per-request metrics the daemon feeds; their running totals are the
                request counters and the latency histogram.
            info: labels of ``edgefleet_agent_info`` (agent_version, device_id, profile).
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(state, requests, info))

    def render(self, accept: str = "") -> tuple[bytes, bytes]:
        """The exposition for a request's Accept header: (content type, body).

        Text format 0.0.4 by default; OpenMetrics when the scraper asks for it.
        """
        encoder, content_type = choose_encoder(accept)
        return content_type.encode(), encoder(self.registry)
