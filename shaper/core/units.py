"""Parsing and formatting of the quantities rules are written in.

Durations ("20ms", "1.5s", "500us"), percentages ("1%", 0-100), rates in tc's
units ("kbit/mbit/gbit" are bits per second, "kbps/mbps" bytes per second) and
sizes ("32kb").  Pure functions: every parser returns an integer in a fixed
base unit or raises InvalidInput naming the field and the accepted form.
"""

from __future__ import annotations

import logging
import math
import re

from shaper.errors import InvalidInput

log = logging.getLogger("shaper")

_NUMBER_TEXT = r"[0-9]+(\.[0-9]+)?|\.[0-9]+"  # a group JSON Schema's patterns can write too
_NUMBER = rf"(?P<num>{_NUMBER_TEXT})"

_DURATION_US = {
    "us": 1,
    "usec": 1,
    "ms": 1_000,
    "msec": 1_000,
    "s": 1_000_000,
    "sec": 1_000_000,
    "m": 60_000_000,
    "min": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,  # a TTL of "30d", the documented maximum
}
DURATION_FORM = "a number with a unit: us, ms, s, m, h or d (e.g. 20ms, 1.5s, 500us, 7d)"
# The JSON Schema patterns (ECMA 262) of the forms the parsers below take, built from
# their own units; as in the documents people write: lower case, at most one space.
# They say nothing of ranges (a percentage's 100 aside), which the parsers check.
DURATION_PATTERN = f"^(0|({_NUMBER_TEXT}) ?({'|'.join(_DURATION_US)}))$"

# tc(8): bit/kbit/mbit/gbit/tbit are bits per second (SI), the "bps" family
# bytes per second; IEC prefixes (kibit, mibps, ...) are powers of 1024.
_RATE_BITS_PER_S = {}  # unit -> bits per second of one of it
for _si, _iec, _mult in (("", "", 0), ("k", "ki", 1), ("m", "mi", 2), ("g", "gi", 3), ("t", "ti", 4)):
    _RATE_BITS_PER_S[_si + "bit"] = 1000**_mult
    _RATE_BITS_PER_S[_si + "bps"] = 8 * 1000**_mult
    if _iec:
        _RATE_BITS_PER_S[_iec + "bit"] = 1024**_mult
        _RATE_BITS_PER_S[_iec + "bps"] = 8 * 1024**_mult
_BYTE_RATE_UNITS = frozenset(u for u in _RATE_BITS_PER_S if u.endswith("bps"))
_PREFIX_NAMES = {"": "", "k": "kilo", "m": "mega", "g": "giga", "t": "tera",
                 "ki": "kibi", "mi": "mebi", "gi": "gibi", "ti": "tebi"}
_warned_byte_rate = False  # once per process: a rules file may use the unit a thousand times
RATE_FORM = "a number with a tc unit: bit, kbit, mbit, gbit, tbit (bits/s) or bps, kbps, mbps, gbps (bytes/s)"
# Listed SI before IEC, bits before bytes, smallest first: the order RATE_FORM reads in.
_RATE_UNITS_LISTED = sorted(_RATE_BITS_PER_S, key=lambda u: (u[:-3].endswith("i"), u in _BYTE_RATE_UNITS,
                                                               _RATE_BITS_PER_S[u]))
RATE_PATTERN = f"^({_NUMBER_TEXT}) ?({'|'.join(_RATE_UNITS_LISTED)})$"

# tc(8) sizes are powers of 1024: "kb" is KiB.
_SIZE_BYTES = {"b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
SIZE_FORM = "bytes as an integer, or a number with a unit: b, kb, mb, gb (powers of 1024)"
SIZE_PATTERN = f"^({_NUMBER_TEXT}) ?({'|'.join(_SIZE_BYTES)})$"
PERCENT_FORM = "a percentage from 0% to 100% written with the % sign (e.g. 1%, 0.5%)"
PERCENT_PATTERN = r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?|\.[0-9]+) ?%$"  # 0 to 100 (parse_percent's range)


def _split(value: object, field: str, form: str) -> tuple[float, str]:
    if isinstance(value, bool) or not isinstance(value, str):
        raise InvalidInput(field, f"expected a string, got {type(value).__name__}", form)
    text = value.strip().lower()
    m = re.fullmatch(_NUMBER + r"\s*(?P<unit>[a-z%]*)", text)
    if not m:
        raise InvalidInput(field, f"cannot parse {value!r}", form)
    num = float(m.group("num"))
    if not math.isfinite(num):
        raise InvalidInput(field, f"{value!r} is not a finite number", form)
    return num, m.group("unit")


def parse_duration_us(value: object, field: str, *, max_us: int) -> int:
    """'20ms' -> 20000.  "0" alone means zero; any other number needs a unit."""
    if isinstance(value, str) and value.strip() == "0":
        return 0
    num, unit = _split(value, field, DURATION_FORM)
    if unit not in _DURATION_US:
        raise InvalidInput(field, f"unknown or missing unit in {value!r}", DURATION_FORM)
    us = num * _DURATION_US[unit]
    if us != 0 and us < 1:
        raise InvalidInput(field, f"{value!r} is below the 1us resolution", DURATION_FORM)
    if us > max_us:
        raise InvalidInput(field, f"{value!r} exceeds the maximum {format_duration_us(max_us)}", DURATION_FORM)
    return round(us)


def parse_percent(value: object, field: str) -> float:
    """'1%' -> 1.0 (a percentage, 0-100)."""
    num, unit = _split(value, field, PERCENT_FORM)
    if unit != "%":
        raise InvalidInput(field, f"{value!r} has no % sign", PERCENT_FORM)
    if num > 100:
        raise InvalidInput(field, f"{value!r} is above 100%", PERCENT_FORM)
    return num


def parse_rate_bits_per_s(value: object, field: str, *, min_bits_per_s: int, max_bits_per_s: int) -> int:
    """'10mbit' -> 10_000_000 bits per second."""
    num, unit = _split(value, field, RATE_FORM)
    if unit not in _RATE_BITS_PER_S:
        raise InvalidInput(field, f"unknown or missing unit in {value!r}", RATE_FORM)
    bits_per_s = round(num * _RATE_BITS_PER_S[unit])
    if unit in _BYTE_RATE_UNITS:
        _warn_byte_rate(value, bits_per_s)
    if not min_bits_per_s <= bits_per_s <= max_bits_per_s:
        raise InvalidInput(
            field,
            f"{value!r} is outside {format_rate_bits_per_s(min_bits_per_s)}..{format_rate_bits_per_s(max_bits_per_s)}",
            RATE_FORM,
        )
    return bits_per_s


def _warn_byte_rate(value: str, bits_per_s: int) -> None:
    """tcconfig and most people read "10Mbps" as megabits; tc (and shaper) as megabytes."""
    global _warned_byte_rate
    if _warned_byte_rate:
        return
    _warned_byte_rate = True
    num, unit = _split(value, "rate", RATE_FORM)
    prefix = _PREFIX_NAMES[unit[:-3]]
    bit_form = f"{_trim(num)}{unit[:-3]}bit"
    # The CLI prints the sentence; the daemon's JSON log lines take "event" from the fields
    # (they are applied after the message), so there it is an event name like the others.
    log.warning("rate %r is %s %sbytes per second in tc's units (%s), not %sbits as tcconfig reads it; "
                "for %s %sbits per second write %s (this warning is shown once)",
                value.strip(), _trim(num), prefix, format_bits_per_s(bits_per_s), prefix, _trim(num), prefix, bit_form,
                extra={"fields": {"event": "rate.bytes_unit", "rate": value.strip(),
                                  "means": format_bits_per_s(bits_per_s), "bits_would_be": bit_form}})


def parse_size_bytes(value: object, field: str, *, min_bytes: int, max_bytes: int) -> int:
    """'32kb' -> 32768; a plain integer is bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        num, unit = _split(value, field, SIZE_FORM)
        if unit not in _SIZE_BYTES:
            raise InvalidInput(field, f"unknown or missing unit in {value!r}", SIZE_FORM)
        size = round(num * _SIZE_BYTES[unit])
    if not min_bytes <= size <= max_bytes:
        raise InvalidInput(field, f"{value!r} is outside {min_bytes}..{max_bytes} bytes", SIZE_FORM)
    return size


def parse_int(value: object, field: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"expected an integer, got {value!r}", f"an integer from {lo} to {hi}")
    if not lo <= value <= hi:
        raise InvalidInput(field, f"{value} is out of range", f"an integer from {lo} to {hi}")
    return value


def _trim(num: float) -> str:
    text = f"{num:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def format_duration_us(us: int) -> str:
    """A short exact form that parses back to the same value: '20ms', '1.5s', '10m', '30d'."""
    if us == 0:
        return "0ms"
    if us % 86_400_000_000 == 0:
        return f"{us // 86_400_000_000}d"
    if us % 3_600_000_000 == 0:
        return f"{us // 3_600_000_000}h"
    if us % 60_000_000 == 0:
        return f"{us // 60_000_000}m"
    if us >= 1_000_000 and us % 1000 == 0:
        return _trim(us / 1_000_000) + "s"
    if us >= 1000:
        return _trim(us / 1000) + "ms"
    return f"{us}us"


def format_percent(pct: float) -> str:
    return _trim(pct) + "%"


def format_rate_bits_per_s(bits_per_s: int) -> str:
    """A rate in tc's units that parses back to the same value: '10mbit', '1.5gbit', '8kbit'."""
    for unit, mult in (("tbit", 10**12), ("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits_per_s >= mult and bits_per_s % (mult // 1000) == 0:
            return _trim(bits_per_s / mult) + unit
    return f"{bits_per_s}bit"


def format_size_bytes(size: int) -> str:
    for unit, mult in (("mb", 1024**2), ("kb", 1024)):
        if size >= mult and size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size}b"


def format_bits_per_s(bits: float) -> str:
    """A measured rate for people: '0 bit/s', '950 bit/s', '1.2 kbit/s', '85.3 Mbit/s' (SI, as link speeds)."""
    for unit, mult in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= mult:
            return _human(bits / mult) + " " + unit
    return f"{bits:.0f} bit/s"


def format_bytes(size: float) -> str:
    """A byte count for people: '200 B', '1.5 KiB', '3.2 GiB' (powers of 1024, as sizes)."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= mult:
            return _human(size / mult) + " " + unit
    return f"{size:.0f} B"


def format_count(count: float) -> str:
    """A packet count for people: '950', '12.3k', '4.1M'."""
    for unit, mult in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= mult:
            return _human(count / mult) + unit
    return f"{count:.0f}" if count == int(count) or count >= 10 else f"{count:.1f}"


def _human(num: float) -> str:
    """Three significant digits at most, no trailing zeros: 1.5, 12.3, 850."""
    text = f"{num:.1f}" if num < 100 else f"{num:.0f}"
    return text[:-2] if text.endswith(".0") else text
