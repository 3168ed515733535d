"""FeedCheck (the per-model feed check the adapters run per request) accepts and refuses
exactly what check_feeds does, with check_feeds' own message (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import InputRejected
from agent.protocol.manifest import TensorSpec
from agent.serving.runtime import FeedCheck, check_feeds

SPECS = (TensorSpec("image", "float32", ("N", 3, None, 8)), TensorSpec("mask", "bool", (4,)),
         TensorSpec("ids", "int64", ()))
GOOD = {"image": np.zeros((2, 3, 5, 8), np.float32), "mask": np.ones(4, bool),
        "ids": np.array(7, np.int64)}

CASES = [
    ("good", GOOD),
    ("good-other-batch-and-free-dim", {**GOOD, "image": np.zeros((9, 3, 1, 8), np.float32)}),
    ("missing-input", {k: v for k, v in GOOD.items() if k != "mask"}),
    ("unknown-input", {**GOOD, "extra": np.zeros(1, np.float32)}),
    ("unknown-instead-of-one", {**{k: v for k, v in GOOD.items() if k != "ids"},
                                "idz": np.array(7, np.int64)}),
    ("wrong-dtype", {**GOOD, "image": np.zeros((2, 3, 5, 8), np.float64)}),
    ("wrong-dtype-scalar", {**GOOD, "ids": np.array(7, np.int32)}),
    ("wrong-rank", {**GOOD, "image": np.zeros((3, 5, 8), np.float32)}),
    ("wrong-fixed-dim", {**GOOD, "image": np.zeros((2, 4, 5, 8), np.float32)}),
    ("wrong-last-fixed-dim", {**GOOD, "image": np.zeros((2, 3, 5, 7), np.float32)}),
    ("wrong-1d-size", {**GOOD, "mask": np.ones(5, bool)}),
    ("scalar-given-a-vector", {**GOOD, "ids": np.array([7], np.int64)}),
    ("empty", {}),
]


def _outcome(check: object, feeds: dict[str, np.ndarray]) -> str | None:
    assert callable(check)
    try:
        check(feeds)
    except InputRejected as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("feeds", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_feed_check_matches_check_feeds(feeds: dict[str, np.ndarray]) -> None:
    want = _outcome(lambda f: check_feeds(SPECS, f), feeds)
    assert _outcome(FeedCheck(SPECS), feeds) == want


def test_the_table_has_both_outcomes() -> None:
    outcomes = [_outcome(FeedCheck(SPECS), feeds) for _, feeds in CASES]
    assert outcomes[:2] == [None, None]
    assert all(o is not None for o in outcomes[2:])
