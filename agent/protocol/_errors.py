"""The root of every error :mod:`agent.protocol` raises on purpose (private; re-exported).

The tree is drawn in :mod:`agent.protocol`'s docstring. Pure: standard library only.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "shown"]


class ProtocolError(ValueError):
    """Bytes or data from outside are not what the wire format allows.

    A ``ValueError``, so code written before this root existed keeps catching what it caught.
    """


def shown(actual: object, limit: int = 120, *, quote_strings: bool = True) -> str:
    """``actual`` as an error message shows it: ``repr``, cut to ``limit`` characters.

    Never raises on odd values: an int too large for ``repr`` (over 4300 digits) is described
    by its size instead. With ``quote_strings=False`` a non-empty printable string is shown as
    it is (``got 1235 bytes``), anything else still as its ``repr``.
    """
    if not quote_strings and isinstance(actual, str) and actual and actual.isprintable():
        text = actual
    else:
        try:
            text = repr(actual)
        except ValueError:  # int -> str conversion limit
            size = actual.bit_length() if isinstance(actual, int) else "?"
            text = f"<{type(actual).__name__} of {size} bits>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
