"""Number formats of the report: three significant digits, counts as 1.52M / 3.40B,
bytes in binary units, shares as percentages. ``None`` (and NaN) print as a dash."""

from __future__ import annotations

import math

DASH = "—"
_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def sig(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, trailing zeros kept (0.0700, 3.04, 2950);
    at 10,000 and above with a k/M/B/T suffix (491520 -> 492k)."""
    if _missing(x):
        return DASH
    if abs(x) >= 1e4 * (1 - 0.5 * 10**-digits):  # 9999.6 is 10.0k, not 10000
        return count(x, digits)
    if x == 0:
        return "0"
    if abs(x) < 1e-4:
        return f"{x:.{digits - 1}e}"
    text = f"{x:#.{digits}g}"
    if "e" in text:  # e.g. 1000.0 at 3 digits
        text = f"{round(x, digits - 1 - math.floor(math.log10(abs(x)))):.0f}"
    return text.rstrip(".")


def count(n: float | None, digits: int = 3) -> str:
    """A count with a k/M/B/T suffix at 3 significant digits: 2698240 -> 2.70M."""
    if _missing(n):
        return DASH
    for scale, suffix in _SUFFIXES:
        if abs(n) >= scale * (1 - 0.5 * 10**-digits):  # 999.6k rounds up to 1.00M
            return sig(n / scale, digits) + suffix
    return sig(n, digits)


def nbytes(n: float | None) -> str:
    """Bytes in binary units: 2272384 -> 2.17 MiB."""
    if _missing(n):
        return DASH
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{sig(n / scale)} {unit}"
    return f"{int(n)} B"


def pct(x: float | None) -> str:
    """A fraction as a percentage with 3 significant digits: 0.2636 -> 26.4%."""
    return DASH if _missing(x) else f"{sig(100 * x)}%"


def times(x: float | None) -> str:
    """A ratio as a speed-up: 0.7645 -> 0.76x (two decimals, as the profile report)."""
    return DASH if _missing(x) else f"{x:.2f}x"


def signed(x: float | None) -> str:
    """A difference with its sign: 0.00815 -> +0.00815."""
    return DASH if _missing(x) else ("+" if x >= 0 else "") + sig(x)
