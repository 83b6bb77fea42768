"""The daemon's API with netem, inside the VM: PUT a delay, change it live, delete it."""

from lab import V4, V6


def rtt(lab, addr: str) -> float:
    return lab.ping(addr, count=20, interval=0.05)["median"]  # a TCG stall moves a mean, not a median


def test_put_change_delete_a_delay_through_the_api(lab):
    base_a, base_b = rtt(lab, V4["a"]), rtt(lab, V4["b"])
    d = lab.daemon()
    status, rule = d.request("PUT", "/rules/a", {"dst": [V4["a"]], "delay": "40ms"})
    assert status == 200 and rule["delay"] == "40ms", (status, rule, d.log_text()[-3000:])
    a40, b = rtt(lab, V4["a"]), rtt(lab, V4["b"])
    handles = lab.handles()
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "delay": "10ms"})[0] == 200
    a10 = rtt(lab, V4["a"])
    assert lab.handles() == handles  # changed live, in place
    assert d.request("DELETE", "/rules/a") == (200, {"deleted": ["a"]})
    a0 = rtt(lab, V4["a"])
    print(f"\nVM API: a {base_a:.2f} -> 40ms {a40:.2f} -> 10ms {a10:.2f} -> deleted {a0:.2f} ms; "
          f"b {base_b:.2f} -> {b:.2f} ms")
    assert 39 <= a40 - base_a <= 46
    assert b <= base_b + 5
    assert 9 <= a10 - base_a <= 15
    assert a0 <= base_a + 5
    assert d.stop() == 0
    assert "netem" not in lab.tc_state() and "htb" not in lab.tc_state()


def test_latency_compatibility_endpoint(lab):
    base_b, base_b6 = rtt(lab, V4["b"]), rtt(lab, V6["b"])
    d = lab.daemon()
    status, rule = d.request("GET", "/latency/20ms")
    assert status == 200 and rule["dst"] == ["::/0", "0.0.0.0/0"], (status, rule, d.log_text()[-3000:])
    b, b6 = rtt(lab, V4["b"]), rtt(lab, V6["b"])
    assert d.request("GET", "/latency/0ms") == (200, {"deleted": ["latency"]})
    after = rtt(lab, V4["b"])
    print(f"\nVM /latency/20ms: b {base_b:.2f} -> {b:.2f} ms, b(v6) {base_b6:.2f} -> {b6:.2f} ms; "
          f"/latency/0ms: {after:.2f} ms")
    assert 19 <= b - base_b <= 26 and 19 <= b6 - base_b6 <= 26
    assert after <= base_b + 5
    assert d.stop() == 0
