"""The time range and bucket size of a monitoring query (pure).

Times are unix seconds on the SERVER's clock: a record belongs to the moment the server
received it (``device_records.received_at``), not to the device's clock. Devices such as a
Raspberry Pi have no real-time clock and may run on a wrong time until NTP answers, and the
rollout gates judge records by the same column, so both read the same numbers. A device that
was offline shows its buffered intervals when they arrive.

A range is ``(since, until]``. Buckets are aligned to multiples of ``bucket_s`` since the epoch,
so the same bucket has the same start in every query; the first may begin before ``since``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fleet_server.errors import InvalidInput

__all__ = ["DEFAULT_SPAN_S", "MAX_BUCKETS", "NICE_BUCKETS_S", "TimeRange"]

#: the span of a query that names no ``since``
DEFAULT_SPAN_S: Final = 3600
#: the most buckets one query may ask for
MAX_BUCKETS: Final = 1000
#: bucket sizes chosen when none is given: the smallest giving at most 60 buckets
NICE_BUCKETS_S: Final = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200,
                         86400, 7 * 86400)
_AUTO_BUCKETS: Final = 60


@dataclass(frozen=True)
class TimeRange:
    since: int
    until: int
    bucket_s: int

    @classmethod
    def make(cls, now: int, *, since: int | None = None, until: int | None = None,
             bucket_s: int | None = None) -> TimeRange:
        """``(since, until]`` with defaults: ``until`` now, ``since`` an hour before it,
        ``bucket_s`` the smallest of :data:`NICE_BUCKETS_S` giving at most 60 buckets.

        Raises:
            InvalidInput: ``since`` not before ``until``, a bucket under 1 s, or more than
                :data:`MAX_BUCKETS` buckets.
        """
        end = now if until is None else until
        start = end - DEFAULT_SPAN_S if since is None else since
        if start >= end:
            raise InvalidInput(f"since: expected a time before until ({end}), got {start}")
        span = end - start
        if bucket_s is None:
            bucket_s = next((b for b in NICE_BUCKETS_S if span / b <= _AUTO_BUCKETS),
                            NICE_BUCKETS_S[-1])
        if bucket_s < 1:
            raise InvalidInput(f"bucket: expected seconds >= 1, got {bucket_s}")
        rng = cls(start, end, bucket_s)
        if rng.count > MAX_BUCKETS:
            raise InvalidInput(f"bucket: expected at most {MAX_BUCKETS} buckets over "
                               f"{span} s, got {rng.count} of {bucket_s} s "
                               f"(use a bucket of at least {-(-span // MAX_BUCKETS)} s)")
        return rng

    @property
    def count(self) -> int:
        """How many buckets the range touches."""
        return (self.bucket(self.until) - self.bucket(self.since + 1)) // self.bucket_s + 1

    def bucket(self, t: int) -> int:
        """The start of the bucket holding time ``t``."""
        return t - t % self.bucket_s

    def starts(self) -> list[int]:
        """The start of every bucket the range touches, in order."""
        first, last = self.bucket(self.since + 1), self.bucket(self.until)
        return list(range(first, last + 1, self.bucket_s))

    def to_dict(self) -> dict[str, int]:
        return {"since": self.since, "until": self.until, "bucket_s": self.bucket_s}
