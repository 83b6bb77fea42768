"""The seed scenario, end to end with netem: a pod namespace runs the sidecar daemon (listening
on every address, with a token, as the injected sidecar does); a client namespace, another pod
of the cluster, calls `curl http://POD_IP:2332/latency/20ms`; its pings to the pod then take
about 20 ms longer (the pod's replies leave through the shaped interface), until /latency/0."""

import json

from lab import V4, parse_ping, sh

TOKEN = "seed-scenario-token-42"


def client_rtt(client: str, count: int = 20) -> float:
    out = sh("ip", "netns", "exec", client, "ping", "-c", str(count), "-i", "0.05", "-W", "2", V4["pod"]).stdout
    return parse_ping(out)["median"]  # a TCG stall moves a mean, not a median


def curl(client: str, path: str, token: str | None = TOKEN) -> tuple[int, str]:
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    out = sh("ip", "netns", "exec", client, "curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}", *auth,
             f"http://{V4['pod']}:2332{path}").stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


def test_curl_latency_from_another_pod(lab, tmp_path):
    client = lab.add_client()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    d = lab.daemon("--listen", ":2332", "--token-file", str(token_file))
    base = client_rtt(client)

    assert curl(client, "/latency/20ms", token=None)[0] == 401  # the token is on by default in pods
    status, body = curl(client, "/latency/20ms")
    assert status == 200 and json.loads(body)["delay"] == "20ms", body
    shaped = client_rtt(client)
    status, body = curl(client, "/latency/0")
    assert status == 200 and json.loads(body) == {"deleted": ["latency"]}, body
    after = client_rtt(client)
    print(f"\nseed scenario: client -> pod rtt {base:.2f} ms; after curl /latency/20ms {shaped:.2f} ms; "
          f"after /latency/0 {after:.2f} ms")
    assert 19 <= shaped - base <= 26
    assert after <= base + 5
    assert d.stop() == 0
