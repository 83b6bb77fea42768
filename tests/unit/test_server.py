"""The daemon's HTTP stack (uvicorn + StrictHttp + HttpApp) served on a unix socket (no network,
no root): strict framing with JSON refusals, the token before the body, the body bounds, the
header deadline, and every handler on the one kernel thread."""

import json
import logging
import socket
import threading
import time

import pytest

from shaper.http import server as S
from shaper.http.api import MAX_BODY_BYTES, Api
from shaper.errors import InvalidInput
from shaper.datapath.fake import FakeDatapath
from shaper.http.server import JsonFormatter, check_exposure, parse_listen
from shaper.control.service import Service

TOKEN = "t0ken"


@pytest.mark.parametrize("text,expected", [
    (":2332", ("", 2332)), ("2332", ("", 2332)), ("127.0.0.1:8080", ("127.0.0.1", 8080)),
    ("[::1]:2332", ("::1", 2332)), ("[::]:0", ("::", 0)), ("localhost:9", ("localhost", 9)),
])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", ":", "host:", ":99999", "::1:2332", "a:b"])
def test_parse_listen_refuses(text):
    with pytest.raises(InvalidInput) as exc:
        parse_listen(text)
    assert exc.value.field == "--listen"


def test_json_log_lines_carry_the_fields():
    record = logging.LogRecord("shaper", logging.INFO, __file__, 1, "rule.put", (), None)
    record.fields = {"who": "10.0.0.9", "rule": "a", "result": "ok"}
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "rule.put" and line["level"] == "info" and line["who"] == "10.0.0.9"
    assert line["ts"].endswith("Z")


def test_an_open_api_beyond_loopback_needs_a_token_or_insecure():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.53"):
        check_exposure(host, None, False)
    for host in ("", "0.0.0.0", "::", "10.0.0.5", "fd00::1", "pod.example"):
        with pytest.raises(InvalidInput) as exc:
            check_exposure(host, None, False)
        assert "--insecure" in str(exc.value) and "--token-file" in str(exc.value)
        check_exposure(host, "t0ken", False)
        check_exposure(host, None, True)


class ThreadsSeen:
    """A datapath that records which threads called it."""

    def __init__(self, inner):
        self.inner = inner
        self.threads: set[str] = set()

    def __getattr__(self, name):
        value = getattr(self.inner, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self.threads.add(threading.current_thread().name)
            return value(*args, **kwargs)
        return call


class Served:
    def __init__(self, path, token=TOKEN):
        self.datapath = ThreadsSeen(FakeDatapath())
        self.service = Service(self.datapath, "eth0", clock=lambda: 10**12)
        self.service.start()
        self.datapath.threads.clear()  # the set-up ran here; from now on only requests call it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(64)
        self.path = str(path)
        self.httpd = S.HttpServer(sock, S.HttpApp(Api(self.service, token), S.KernelThread()))
        self.httpd.start()

    def connect(self, timeout=5.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def exchange(self, raw: bytes, timeout=5.0) -> tuple[int, dict, bytes]:
        """Send raw bytes; read until the server closes; the first answer's status, headers, body."""
        s = self.connect(timeout)
        try:
            s.sendall(raw)
            return parse(read_all(s))
        finally:
            s.close()

    def close(self):
        self.httpd.stop()
        self.httpd.app.kernel.close()


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def parse(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while True:
            size, _, rest = body.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, body = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path / "api.sock")
    yield s
    s.close()


def put(name: bytes, body: bytes, token=TOKEN.encode(), extra=b"") -> bytes:
    return (b"PUT /rules/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n%s" % (name, token, len(body), extra, body))


def test_serves_json_with_a_length_and_its_own_server_name(served):
    body = json.dumps({"dst": ["10.0.0.1"], "delay": "5ms"}).encode()
    status, headers, out = served.exchange(put(b"a", body))
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(out) and json.loads(out)["delay"] == "5ms"
    assert headers["server"].startswith("shaper/")


def test_keep_alive_serves_one_request_after_another(served):
    s = served.connect()
    try:
        for _ in range(3):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"}\n"):
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200") and b'"ok"' in data and b"connection: close" not in data
    finally:
        s.close()


def test_oversized_and_chunked_bodies_are_refused_and_the_connection_closed(served):
    status, headers, out = served.exchange(b"PUT /rules HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
                                           b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
    assert status == 413 and "exceeds" in json.loads(out)["error"] and headers["connection"] == "close"
    status, _, out = served.exchange(b"PUT /rules HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status == 411 and json.loads(out)["error"]


def test_head_has_no_body(served):
    status, _, out = served.exchange(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405 and out == b""


def test_any_other_method_gets_the_apis_405_not_an_html_501(served):
    for method in (b"TRACE", b"OPTIONS", b"PROPFIND"):
        status, headers, out = served.exchange(method + b" /rules HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 405 and headers["allow"] == "DELETE, GET, PUT" and json.loads(out)["error"]


LONG = b"x" * (S.MAX_TARGET_BYTES + 10)
REFUSED = {
    "two Transfer-Encoding": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "chunked, chunked": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
                              b"0\r\n\r\n"),
    "chunked and a length": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                  b"Content-Length: 5\r\n\r\n0\r\n\r\n"),
    "two lengths": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\nContent-Length: 2\r\n\r\n"),
    "a list of lengths": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nContent-Length: 38, 2\r\n\r\n"),
    "+38": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nContent-Length: +38\r\n\r\n"),
    "1_0": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1_0\r\n\r\n"),
    "-1": (400, b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    "two Authorization": (400, b"DELETE /rules HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
                               b"Authorization: Bearer other\r\n\r\n"),
    "no Host": (400, b"GET /readyz HTTP/1.1\r\n\r\n"),
    "two Host": (400, b"GET /readyz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    "HTTP/0.9": (400, b"GET /readyz\r\n\r\n"),
    "HTTP/2.0 line": (400, b"GET /readyz HTTP/2.0\r\nHost: x\r\n\r\n"),
    "space before the colon": (400, b"GET /readyz HTTP/1.1\r\nHost: x\r\nFoo : bar\r\n\r\n"),
    "obs-fold": (400, b"GET /readyz HTTP/1.1\r\nHost: x\r\nFoo: a\r\n b\r\n\r\n"),
    "a long target": (414, b"GET /" + LONG + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    "a huge header": (431, b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * (S.MAX_HEADER_BYTES + 10)
                           + b"\r\n\r\n"),
    "many headers": (431, b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"z" * 1000)
                                                                             for i in range(200)) + b"\r\n"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_ambiguous_or_oversized_requests_are_refused_with_json_and_closed(served, case):
    expected, raw = REFUSED[case]
    s = served.connect()
    try:
        s.sendall(raw)
        data = read_all(s)  # returns only when the server closed the connection
    finally:
        s.close()
    status, headers, body = parse(data)
    assert status == expected, data[:300]
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]
    assert headers["connection"] == "close" and len(body) == int(headers["content-length"])



def test_the_token_is_checked_before_a_byte_of_the_body_is_read(served):
    # 32 MiB declared, none sent, Expect: 100-continue: the answer is 401 at once, never 100.
    s = served.connect()
    try:
        s.sendall(b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % MAX_BODY_BYTES)
        data = read_all(s)
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 401") and b"100 Continue" not in data
    status, headers, _ = parse(data)
    assert headers["connection"] == "close" and headers["www-authenticate"].startswith("Bearer")


def test_the_right_token_gets_100_continue(served):
    body = json.dumps({"dst": ["10.0.0.1"], "delay": "5ms"}).encode()
    s = served.connect()
    try:
        s.sendall(b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        assert read_all(s).startswith(b"HTTP/1.1 200")
    finally:
        s.close()


def test_bodies_in_flight_share_one_budget(served):
    served.httpd.app.budget = S.BodyBudget(1000)
    first = served.connect()
    try:
        first.sendall(b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\nContent-Length: 800\r\n\r\n"
                      b'{"dst": [')  # holds 800 bytes of the budget while it trickles
        time.sleep(0.3)
        status, headers, out = served.exchange(put(b"b", b"{" + b" " * 400 + b"}"))
        assert status == 503 and headers["retry-after"] == "1" and "in flight" in json.loads(out)["error"]
    finally:
        first.close()
    time.sleep(0.3)  # the first connection's share comes back when it goes
    status, _, _ = served.exchange(put(b"b", json.dumps({"dst": ["10.0.0.2"], "delay": "1ms"}).encode()))
    assert status == 200 and served.httpd.app.budget.used == 0


def test_a_slow_request_head_gets_a_json_408_while_others_are_served(served, monkeypatch):
    monkeypatch.setattr(S, "HEADER_DEADLINE_S", 0.5)
    slow = served.connect()
    silent = served.connect()
    try:
        slow.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        started = time.monotonic()
        assert served.exchange(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200
        status, headers, body = parse(read_all(slow))
        assert status == 408 and "took more than" in json.loads(body)["error"]
        assert 0.4 < time.monotonic() - started < 3
        assert parse(read_all(silent))[0] == 408  # connected and never spoke
    finally:
        slow.close()
        silent.close()


def test_a_body_that_does_not_arrive_in_time_gets_408(served, monkeypatch):
    monkeypatch.setattr(S, "BODY_DEADLINE_S", 0.5)
    s = served.connect()
    try:
        s.sendall(b"PUT /rules/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\nContent-Length: 100\r\n\r\n{")
        status, headers, body = parse(read_all(s))
    finally:
        s.close()
    assert status == 408 and "body" in json.loads(body)["error"] and served.httpd.app.budget.used == 0


def test_every_handler_touches_the_datapath_from_one_thread(served):
    for i in range(50):
        body = json.dumps({"dst": [f"10.0.0.{i}"], "delay": "5ms"}).encode()
        assert served.exchange(put(b"r%d" % i, body))[0] == 200
        for path in (b"/readyz", b"/metrics", b"/rules", b"/stats"):
            assert served.exchange(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)[0] == 200
    assert served.datapath.threads == {"kernel_0"}


def test_get_rules_is_streamed_and_parses_to_the_rules(served):
    service = served.service
    dst = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(20000)]
    service.put(__import__("shaper.core.model", fromlist=["parse_rule"]).parse_rule(
        {"dst": dst, "rate": "1mbit", "delay": "2ms"}, name="big"), "test")
    status, headers, body = served.exchange(b"GET /rules HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert json.loads(body) == {"rules": [r.to_dict() for r in service.rules()]}


def test_the_heap_is_trimmed_after_a_large_body_only(served, monkeypatch):
    """A bulk body's garbage goes back to the system after its answer (trim_heap); a small change
    does not pay for a trim."""
    trims = []
    monkeypatch.setattr(S, "trim_heap", lambda: trims.append(1) or True)
    status, _, _ = served.exchange(put(b"a", json.dumps({"dst": ["10.0.0.1"], "delay": "5ms"}).encode()))
    assert status == 200 and trims == []
    rules = [{"name": f"r{i}", "dst": [f"10.1.{i // 250}.{i % 250}"], "delay": "5ms"} for i in range(200)]
    body = json.dumps({"rules": rules, "pad": "x" * S.TRIM_BODY_BYTES}).encode()  # refused (pad): still handled
    status, _, _ = served.exchange(b"PUT /rules HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (TOKEN.encode(), len(body), body))
    assert status == 422 and trims == [1]


def test_trim_heap_gives_back_memory_with_glibc_and_is_a_no_op_without(monkeypatch):
    assert S.trim_heap() is True  # Debian: glibc
    monkeypatch.setattr(S, "_malloc_trim", lambda: None)
    assert S.trim_heap() is False
