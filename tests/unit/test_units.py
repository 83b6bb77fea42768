import math

import pytest

from shaper.errors import InvalidInput
from shaper.core import units as U


@pytest.mark.parametrize("text,us", [("20ms", 20_000), ("1.5s", 1_500_000), ("500us", 500), ("0", 0),
                                     ("10m", 600_000_000), ("1h", 3_600_000_000), (" 2 ms ", 2000),
                                     ("0.5ms", 500), ("250usec", 250)])
def test_duration(text, us):
    assert U.parse_duration_us(text, "delay", max_us=10**12) == us


@pytest.mark.parametrize("text", ["20", "20 parsecs", "-5ms", "nan", "inf", "", "ms", "1e3ms", "0.1us", "5ms5"])
def test_duration_rejects(text):
    with pytest.raises(InvalidInput) as err:
        U.parse_duration_us(text, "delay", max_us=10**12)
    assert err.value.field == "delay" and "ms" in err.value.accepted


def test_duration_max_and_types():
    with pytest.raises(InvalidInput, match="exceeds"):
        U.parse_duration_us("2h", "delay", max_us=3_600_000_000)
    for bad in (20, 1.5, None, True, ["20ms"]):
        with pytest.raises(InvalidInput, match="expected a string"):
            U.parse_duration_us(bad, "delay", max_us=10**9)


@pytest.mark.parametrize("us", [1, 500, 1000, 1500, 20_000, 999_999, 1_000_000, 1_500_000, 61_000_000,
                                600_000_000, 3_600_000_000, 5_400_000_000])
def test_duration_round_trip(us):
    assert U.parse_duration_us(U.format_duration_us(us), "x", max_us=10**13) == us


def test_percent():
    assert U.parse_percent("1%", "loss") == 1.0
    assert U.parse_percent("0.5%", "loss") == 0.5
    assert U.parse_percent("100%", "loss") == 100.0
    for bad in ("1", "101%", "-1%", "abc%", 1, "nan%"):
        with pytest.raises(InvalidInput):
            U.parse_percent(bad, "loss")


@pytest.mark.parametrize("text,bits", [("10mbit", 10**7), ("2mbit", 2 * 10**6), ("1gbit", 10**9),
                                       ("100kbit", 10**5), ("1mbps", 8 * 10**6), ("1kibit", 1024),
                                       ("1.5mbit", 1_500_000), ("10MBit", 10**7)])
def test_rate(text, bits):
    assert U.parse_rate_bits_per_s(text, "rate", min_bits_per_s=1, max_bits_per_s=10**13) == bits


@pytest.mark.parametrize("text", ["10", "10mb", "fast", "10 mbit/s", "0mbit"])
def test_rate_rejects(text):
    with pytest.raises(InvalidInput) as err:
        U.parse_rate_bits_per_s(text, "rate", min_bits_per_s=8000, max_bits_per_s=10**13)
    assert err.value.field == "rate"


@pytest.mark.parametrize("bits", [8000, 10**5, 2 * 10**6, 10**7, 1_500_000, 10**9, 123_456])
def test_rate_round_trip(bits):
    assert U.parse_rate_bits_per_s(U.format_rate_bits_per_s(bits), "r", min_bits_per_s=1, max_bits_per_s=10**13) == bits


def test_size():
    assert U.parse_size_bytes("32kb", "burst", min_bytes=1, max_bytes=2**30) == 32768
    assert U.parse_size_bytes(3000, "burst", min_bytes=1, max_bytes=2**30) == 3000
    assert U.parse_size_bytes(U.format_size_bytes(65536), "b", min_bytes=1, max_bytes=2**30) == 65536
    with pytest.raises(InvalidInput):
        U.parse_size_bytes("32 furlongs", "burst", min_bytes=1, max_bytes=2**30)
    with pytest.raises(InvalidInput):
        U.parse_size_bytes(10, "burst", min_bytes=1600, max_bytes=2**30)
    assert not math.isnan(U.parse_percent("0%", "x"))


def test_bare_bit_units():
    assert U.parse_rate_bits_per_s("8000bit", "rate", min_bits_per_s=1, max_bits_per_s=10**13) == 8000
    assert U.parse_rate_bits_per_s("1000bps", "rate", min_bits_per_s=1, max_bits_per_s=10**13) == 8000


@pytest.mark.parametrize("bits,text", [(0, "0 bit/s"), (999, "999 bit/s"), (1500, "1.5 kbit/s"),
                                       (10_000_000, "10 Mbit/s"), (85_300_000, "85.3 Mbit/s"),
                                       (123_456_789, "123 Mbit/s"), (2.5e9, "2.5 Gbit/s")])
def test_format_bits_per_s(bits, text):
    assert U.format_bits_per_s(bits) == text


@pytest.mark.parametrize("size,text", [(0, "0 B"), (200, "200 B"), (1536, "1.5 KiB"), (5 * 2**30, "5 GiB"),
                                       (1023, "1023 B"), (3 * 2**40, "3 TiB")])
def test_format_bytes(size, text):
    assert U.format_bytes(size) == text


@pytest.mark.parametrize("count,text", [(0, "0"), (3, "3"), (0.5, "0.5"), (12.25, "12"), (12_345, "12.3k"),
                                        (4_100_000, "4.1M")])
def test_format_count(count, text):
    assert U.format_count(count) == text


def test_a_bytes_per_second_unit_warns_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(U, "_warned_byte_rate", False)
    assert U.parse_rate_bits_per_s("10mbit", "rate", min_bits_per_s=1, max_bits_per_s=10**13) == 10**7
    assert not caplog.records  # bits: nothing to say
    assert U.parse_rate_bits_per_s("10Mbps", "rate", min_bits_per_s=1, max_bits_per_s=10**13) == 8 * 10**7
    assert U.parse_rate_bits_per_s("1kbps", "rate", min_bits_per_s=1, max_bits_per_s=10**13) == 8000
    assert [r.getMessage() for r in caplog.records] == [
        "rate '10Mbps' is 10 megabytes per second in tc's units (80 Mbit/s), not megabits as tcconfig reads it; "
        "for 10 megabits per second write 10mbit (this warning is shown once)"]
    for unit, said in (("bps", "100 bytes per second"), ("gibps", "100 gibibytes per second")):
        monkeypatch.setattr(U, "_warned_byte_rate", False)
        caplog.clear()
        U.parse_rate_bits_per_s(f"100{unit}", "rate", min_bits_per_s=1, max_bits_per_s=10**15)
        assert said in caplog.records[0].getMessage(), caplog.records[0].getMessage()
        assert f"write 100{unit[:-3]}bit" in caplog.records[0].getMessage()


def test_the_bytes_rate_warning_is_an_event_in_the_daemons_json_log(monkeypatch):
    import io
    import json
    import logging

    from shaper.http.server import JsonFormatter

    monkeypatch.setattr(U, "_warned_byte_rate", False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("shaper")
    logger.addHandler(handler)
    try:
        U.parse_rate_bits_per_s("10mbps", "rate", min_bits_per_s=1, max_bits_per_s=10**13)
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "rate.bytes_unit" and line["level"] == "warning"
    assert (line["rate"], line["means"], line["bits_would_be"]) == ("10mbps", "80 Mbit/s", "10mbit")


def test_days_reach_the_documented_ttl_maximum():
    # README: ttl "max 30 days"; "30d" was refused for want of a unit.
    assert U.parse_duration_us("30d", "ttl", max_us=30 * 86_400_000_000) == 30 * 86_400_000_000
    assert U.parse_duration_us("1.5d", "ttl", max_us=30 * 86_400_000_000) == 36 * 3_600_000_000
    assert U.format_duration_us(30 * 86_400_000_000) == "30d" and U.format_duration_us(36 * 3_600_000_000) == "36h"
    with pytest.raises(InvalidInput) as err:
        U.parse_duration_us("31d", "ttl", max_us=30 * 86_400_000_000)
    assert "maximum 30d" in str(err.value) and " d " in err.value.accepted.replace(",", " ")
