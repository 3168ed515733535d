"""agent.drift.summary: windowed drift summaries of a REAL model's traffic against its baseline.

The baseline is what ``model_tools`` puts in a bundle: :func:`compute_baseline` over the digits
calibration split and a trained scikit-learn MLP's outputs on it. Live traffic is the held-out
eval split, as is (in distribution) and shifted by :func:`model_tools.examples.digits.shifted`.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest

from agent.buffer import Outbox
from agent.drift import (
    DRIFT_SUMMARY_KIND,
    MAX_SUMMARY_COUNTS,
    PSI_ALERT,
    SUMMARY_VERSION,
    DriftMonitor,
    DriftSummary,
    bin_counts,
)
from agent.protocol.messages import DriftBatch
from model_tools.baseline import compute_baseline
from model_tools.examples.digits import digits_split, fit_digits_mlp, shifted

T0 = 1_700_000_000.0
DEAD_BLOCK = sorted(r * 8 + c for r in range(2, 6) for c in range(2, 6))


class Digits:
    def __init__(self) -> None:
        x_train, y_train, self.x_cal, _, self.x_eval, _ = digits_split()
        self.clf = fit_digits_mlp(x_train, y_train)
        self.baseline = compute_baseline(
            {"input": self.x_cal}, self.outputs(self.x_cal), task="classification",
            source="calibration")
        features = self.baseline["inputs"]["input"]["features"]
        # a feature the calibration set saw (almost) only one value of: any change is "drift"
        self.degenerate = {f["index"] for f in features if max(f["ref"]) >= 0.95}

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": self.clf.predict_proba(x).astype(np.float32),
                "label": self.clf.predict(x).astype(np.int64)}

    def monitor(self, **kwargs: Any) -> DriftMonitor:
        args: dict[str, Any] = {"window": len(self.x_eval), "window_s": 3600.0,
                                    "model": "digits-mlp", "version": "3"}
        args.update(kwargs)
        return DriftMonitor(self.baseline, **args)

    def feed(self, monitor: DriftMonitor, x: np.ndarray, *, batch: int = 17,
             step_s: float = 0.1) -> list[DriftSummary]:
        """Serve ``x`` in batches, as the inference API would; collect closed windows."""
        summaries = []
        outputs = self.outputs(x)
        for i, start in enumerate(range(0, len(x), batch)):
            part = slice(start, start + batch)
            got = monitor.observe({"input": x[part]},
                                  {name: out[part] for name, out in outputs.items()},
                                  T0 + i * step_s)
            if got is not None:
                summaries.append(got)
        return summaries


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def psi_by_feature(summary: DriftSummary) -> dict[int, float]:
    [entry] = summary.inputs
    return {f.feature: f.psi for f in entry.features}


def test_in_distribution_traffic_stays_under_the_alert_threshold(digits: Digits) -> None:
    [summary] = digits.feed(digits.monitor(), digits.x_eval)
    assert summary.predictions == len(digits.x_eval)
    psis = psi_by_feature(summary)
    assert len(psis) == 64
    assert max(p for f, p in psis.items() if f not in digits.degenerate) < PSI_ALERT
    assert summary.alerts == 0 and summary.max_psi < PSI_ALERT
    outputs = {e.name: e.features[0] for e in summary.outputs}
    assert outputs["probabilities"].psi < 0.1 and outputs["label"].psi < 0.1
    assert all(f.samples == len(digits.x_eval) for f in outputs.values())


SHIFTS = [
    # (kind, features that must alert, features that must not, output must alert)
    ("dead", set(DEAD_BLOCK), set(range(64)) - set(DEAD_BLOCK), True),
    ("offset", set(range(64)), set(), False),
    ("scale", None, set(), False),  # None: every feature that is mostly non-zero
]


@pytest.mark.parametrize(("kind", "must", "must_not", "output_alerts"), SHIFTS,
                         ids=[s[0] for s in SHIFTS])
def test_shifted_traffic_crosses_the_threshold_on_the_affected_features(
        digits: Digits, kind: str, must: set[int] | None, must_not: set[int],
        output_alerts: bool) -> None:
    [summary] = digits.feed(digits.monitor(), shifted(digits.x_eval, kind))
    psis = psi_by_feature(summary)
    alerting = {f for f, p in psis.items() if p >= PSI_ALERT}
    if must is None:  # scaled by 1.8: zeros stay put, so the features mostly non-zero move
        must = {f for f in range(64) if np.median(digits.x_cal[:, f]) > 0}
        assert len(must) >= 30
    assert must <= alerting
    assert not alerting & must_not
    assert summary.alerts == len(alerting) and summary.max_psi >= 1.0
    assert (summary.output_alerts > 0) is output_alerts


def test_no_input_value_leaves_the_device(digits: Digits) -> None:
    rng = np.random.default_rng(7)
    # distinctive values: eval digits plus noise, so any copy of one would be recognisable
    x = (digits.x_eval + rng.uniform(0.001, 0.002, digits.x_eval.shape)).astype(np.float32)
    [summary] = digits.feed(digits.monitor(), x)
    body = summary.to_body()
    text = json.dumps(body)
    numbers: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append(float(value))

    walk(body)
    values = {float(v) for v in x.ravel()}
    assert not values & set(numbers)
    assert not any(repr(float(v)) in text or str(v) in text for v in x.ravel()[:2000])
    # and the body is small: statistics, not data
    assert len(text) < 12_000 < x.nbytes


def test_the_body_is_json_and_fits_a_drift_batch(digits: Digits) -> None:
    [summary] = digits.feed(digits.monitor(), shifted(digits.x_eval, "dead"))
    body = summary.to_body()
    assert json.loads(json.dumps(body, allow_nan=False)) == body
    assert body["version"] == SUMMARY_VERSION
    assert (body["model"], body["model_version"]) == ("digits-mlp", "3")
    assert body["window"]["predictions"] == len(digits.x_eval)
    assert body["window"]["start"] == T0 and body["window"]["end"] > T0
    assert body["baseline"] == {"version": 1, "source": "calibration", "samples": 200}
    assert body["alerts"] == 16 and body["threshold"] == PSI_ALERT
    assert body["max_psi"] == max(f["psi"] for f in body["inputs"]["input"]["features"])
    assert set(body["outputs"]) == {"probabilities", "label"}
    assert body["outputs"]["label"]["kind"] == "classes"
    feature = body["inputs"]["input"]["features"][18]
    assert set(feature) == {"feature", "psi", "js", "samples", "counts"}
    assert feature["feature"] == 18
    assert 0 <= feature["js"] <= 1 and feature["samples"] == len(digits.x_eval)
    # the live counts per reference bin: exactly what binning the window's column gives
    [ref] = [f for f in digits.baseline["inputs"]["input"]["features"] if f["index"] == 18]
    live = bin_counts(shifted(digits.x_eval, "dead")[:, 18], ref["edges"]).tolist()
    assert feature["counts"] == live and len(live) == len(ref["ref"])
    assert sum(live) == feature["samples"] and live[0] == len(digits.x_eval)  # dead: all 0
    # outputs carry their PSI and JS only
    assert set(body["outputs"]["label"]["features"][0]) == {"feature", "psi", "js", "samples"}
    # it goes through the outbox and the wire format unchanged
    box = Outbox.in_memory(device_id="pi-01", max_rows=10)
    box.append("drift", DRIFT_SUMMARY_KIND, body, at=summary.end, priority="summary")
    [batch] = box.build_batches("drift", 10)
    assert isinstance(batch, DriftBatch)
    assert DriftBatch.from_bytes(batch.to_bytes()).records[0].body == body


def test_a_very_wide_input_sends_its_drift_without_bin_counts(digits: Digits) -> None:
    """Past MAX_SUMMARY_COUNTS live counts a body carries none; PSI and JS are still there."""
    rng = np.random.default_rng(3)
    wide = rng.normal(size=(300, 600))
    baseline = compute_baseline({"x": wide}, {"y": wide[:, 0]}, task="regression",
                                source="calibration")
    monitor = DriftMonitor(baseline, window=300, window_s=60.0)
    live = rng.normal(size=(300, 600))
    summary = monitor.observe({"x": live}, {"y": live[:, 0]}, T0)
    assert summary is not None
    assert sum(e.count_size for e in summary.inputs) > MAX_SUMMARY_COUNTS
    body = summary.to_body()
    features = body["inputs"]["x"]["features"]
    assert len(features) == 600 and not any("counts" in f for f in features)
    assert all(f["samples"] == 300 and f["psi"] >= 0 for f in features)
    # the narrow digits body carries them
    [narrow] = digits.feed(digits.monitor(), digits.x_eval)
    assert all("counts" in f for f in narrow.to_body()["inputs"]["input"]["features"])


# ---------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------
def test_a_window_closes_at_n_predictions_and_starts_again(digits: Digits) -> None:
    monitor = digits.monitor(window=100)
    summaries = digits.feed(monitor, digits.x_eval, batch=10)
    assert [s.predictions for s in summaries] == [100] * 5
    assert monitor.predictions == 40
    rest = monitor.flush()
    assert rest is not None and rest.predictions == 40
    assert monitor.flush() is None and monitor.predictions == 0
    # consecutive windows do not overlap in time
    assert all(a.end < b.start for a, b in itertools.pairwise(summaries))


def test_a_window_closes_after_window_s_seconds(digits: Digits) -> None:
    monitor = digits.monitor(window=10_000, window_s=10.0)
    x = digits.x_eval
    outs = digits.outputs(x)

    def observe(i: int, now: float) -> DriftSummary | None:
        return monitor.observe({"input": x[i:i + 5]}, {k: v[i:i + 5] for k, v in outs.items()},
                               now)

    assert observe(0, T0) is None
    assert observe(5, T0 + 6) is None
    assert not monitor.due(T0 + 9.9) and monitor.due(T0 + 10)
    summary = observe(10, T0 + 12)  # past the window: closes it before counting this batch
    assert summary is not None
    assert (summary.start, summary.end, summary.predictions) == (T0, T0 + 6, 10)
    assert monitor.predictions == 5
    assert observe(15, T0 + 13) is None
    flushed = monitor.flush()
    assert flushed is not None and (flushed.start, flushed.end) == (T0 + 12, T0 + 13)


def test_memory_does_not_grow_with_traffic(digits: Digits) -> None:
    monitor = digits.monitor(window=10**9, window_s=10**9)
    digits.feed(monitor, digits.x_eval, batch=1)
    entry = monitor._inputs[0]
    sizes = [h.counts.size for h in entry.hists] + [entry.buffer.size]
    digits.feed(monitor, np.concatenate([digits.x_eval] * 4), batch=64)
    assert [h.counts.size for h in entry.hists] + [entry.buffer.size] == sizes
    summary = monitor.flush()
    assert summary is not None and summary.predictions == 5 * len(digits.x_eval)


def test_image_inputs_and_score_outputs(digits: Digits) -> None:
    """The other baseline kinds: an NCHW image input and a regression-style scores output."""
    images = digits.x_cal.reshape(-1, 1, 8, 8)
    scores = images.mean(axis=(1, 2, 3))
    baseline = compute_baseline({"image": images}, {"score": scores}, task="regression",
                                source="calibration")
    assert baseline["inputs"]["image"]["kind"] == "image"
    monitor = DriftMonitor(baseline, window=540, window_s=60.0)
    x = digits.x_eval.reshape(-1, 1, 8, 8)
    calm = monitor.observe({"image": x}, {"score": x.mean(axis=(1, 2, 3))}, T0)
    bright = shifted(x, "offset")
    drifted = monitor.observe({"image": bright}, {"score": bright.mean(axis=(1, 2, 3))}, T0)
    assert calm is not None and drifted is not None
    assert calm.max_psi < PSI_ALERT < drifted.max_psi
    assert calm.output_max_psi < PSI_ALERT < drifted.output_max_psi
    assert drifted.to_body()["inputs"]["image"]["features"][0]["samples"] == x.size
    assert calm.model is None and calm.to_body()["model"] is None


# ---------------------------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------------------------
BAD_OBSERVATIONS = [
    ("missing-input", lambda x, o: ({}, o), "expected by the baseline"),
    ("missing-output", lambda x, o: ({"input": x}, {"label": o["label"]}), "probabilities"),
    ("wrong-width", lambda x, o: ({"input": x[:, :10]}, o), r"expected shape \[N, 64\]"),
    ("not-batch-first", lambda x, o: ({"input": x[0]}, o), "expected shape"),
    ("nan-input", lambda x, o: ({"input": np.where(x == x.max(), np.nan, x)}, o), "NaN"),
    ("strings", lambda x, o: ({"input": x.astype(str)}, o), "real numeric"),
    ("batch-sizes-differ", lambda x, o: ({"input": x[:3]}, o), "one batch size"),
    ("negative-label", lambda x, o: ({"input": x}, {**o, "label": -o["label"] - 1}), ">= 0"),
    ("scores-as-labels", lambda x, o: ({"input": x}, {**o, "label": o["probabilities"][:, 0]}),
     "integer labels"),
]


@pytest.mark.parametrize(("name", "change", "match"), BAD_OBSERVATIONS,
                         ids=[c[0] for c in BAD_OBSERVATIONS])
def test_bad_observations_are_refused_and_count_nothing(digits: Digits, name: str, change: Any,
                                                        match: str) -> None:
    monitor = digits.monitor()
    x = digits.x_eval[:5]
    inputs, outputs = change(x, digits.outputs(x))
    with pytest.raises(ValueError, match=match):
        monitor.observe(inputs, outputs, T0)
    assert monitor.predictions == 0 and monitor.flush() is None


BAD_MONITORS = [
    ("newer-baseline", {"baseline": {"version": 2}}, "baseline version"),
    ("no-inputs", {"baseline": {"version": 1, "inputs": {}, "outputs": {}}}, "inputs"),
    ("unknown-kind", {"baseline": {"version": 1, "inputs": {"x": {"kind": "audio"}},
                                    "outputs": {}}}, "kind"),
    ("output-kind-as-input", {"baseline": {"version": 1, "inputs": {"x": {
        "kind": "classes", "ref": [0.5, 0.5]}}, "outputs": {}}}, "tabular or image or tensor"),
    ("zero-window", {"window": 0}, "window"),
    ("bool-window", {"window": True}, "window"),
    ("negative-window-s", {"window_s": -1.0}, "window_s"),
    ("nan-window-s", {"window_s": math.nan}, "window_s"),
]


@pytest.mark.parametrize(("name", "change", "match"), BAD_MONITORS,
                         ids=[c[0] for c in BAD_MONITORS])
def test_bad_monitors_are_refused(digits: Digits, name: str, change: dict[str, Any],
                                  match: str) -> None:
    args: dict[str, Any] = {"baseline": digits.baseline, "window": 10, "window_s": 1.0}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        DriftMonitor(args.pop("baseline"), **args)
